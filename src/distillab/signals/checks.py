"""Config checks of the teacher-signal keys (sampled draws, cross-tokenizer divergences, several
teachers), kept beside the signals they describe; `distillab.config.validate_kd` calls them.

Each refusal is one line naming the key and what to do.
"""

from __future__ import annotations

from distillab.errors import ConfigError

# Divergences that compare a teacher and a student with different vocabularies.
CROSS_TOKENIZER = ("uld", "alm")
# The largest number of draws per position (counts are stored in one byte).
MAX_SAMPLES = 255


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def validate_signal(kd) -> None:
    """The sampled, cross-tokenizer and several-teacher keys of a `KDConfig`, alone and together."""
    validate_samples(kd)
    if kd.divergence in CROSS_TOKENIZER:
        for key in ("top_k", "top_p", "samples"):
            require(getattr(kd, key) is None, f"kd.{key}", f"leave unset with kd.divergence={kd.divergence} (it "
                    "compares whole distributions of two vocabularies)")
        require(not kd.tail_bucket, "kd.tail_bucket", f"leave unset with kd.divergence={kd.divergence}")
        require(kd.cache in ("auto", "off"), "kd.cache", f"a cross-tokenizer teacher (kd.divergence="
                f"{kd.divergence}) runs online; set kd.cache=off")
        require(not kd.teachers, "kd.teachers", f"several teachers with kd.divergence={kd.divergence} are not "
                "supported; name one teacher")
    validate_teachers(kd)


def validate_samples(kd) -> None:
    require(kd.proposal_temperature > 0, "kd.proposal_temperature", f"must be > 0, got {kd.proposal_temperature}")
    if kd.samples is None:
        require(kd.proposal_temperature == 1.0, "kd.proposal_temperature", "applies to sampled signals only; set "
                "kd.samples too")
        return
    require(1 <= kd.samples <= MAX_SAMPLES, "kd.samples", f"must be in [1, {MAX_SAMPLES}], got {kd.samples}")
    require(kd.divergence == "forward_kl", "kd.divergence",
            f"{kd.divergence} has no unbiased estimator from sampled teacher tokens (only forward_kl's gradient "
            "q - p is linear in the teacher's p); use forward_kl, or leave kd.samples unset")
    require(kd.temperature == 1.0 and kd.temperature_schedule.shape == "constant", "kd.temperature",
            "must be 1 with kd.samples (the draws estimate the teacher at T = 1; kd.proposal_temperature "
            "shapes the draws instead)")
    for key in ("top_k", "top_p"):
        require(getattr(kd, key) is None, f"kd.{key}", "leave unset with kd.samples (a sampled signal keeps "
                "only the tokens drawn, weighted to stay unbiased)")
    require(not kd.tail_bucket, "kd.tail_bucket", "leave unset with kd.samples")


def validate_teachers(kd) -> None:
    n = 1 + len(kd.teachers)
    require(not kd.teachers or kd.teacher is not None, "kd.teachers", "name the first teacher in kd.teacher")
    require(kd.teacher_mix == "mixture" or kd.teachers, "kd.teacher_mix",
            "route needs several teachers (kd.teachers)")
    require(not kd.teacher_weights or len(kd.teacher_weights) == n, "kd.teacher_weights",
            f"give one weight per teacher ({n}: kd.teacher and kd.teachers), or none for equal weights")
    for i, weight in enumerate(kd.teacher_weights):
        require(weight > 0, f"kd.teacher_weights[{i}]", f"must be > 0, got {weight}")
    if not kd.caches:
        return
    require(len(kd.caches) == len(kd.teachers), "kd.caches", f"give one cache per teacher of kd.teachers "
            f"({len(kd.teachers)}), in order (kd.cache is kd.teacher's)")
    require(kd.cache not in ("auto", "off"), "kd.cache", "name kd.teacher's cache too: every teacher is read "
            "from a cache, or none")
    require(kd.teacher_mix == "route" or kd.samples is not None, "kd.caches",
            "a mixture of top-K caches is not derivable (a token one teacher kept lies in another's tail, its "
            "probability unknown); mix sampled caches (kd.samples) or route documents (kd.teacher_mix=route)")


def teacher_weights(kd) -> tuple[float, ...]:
    """The normalised weights of [kd.teacher, *kd.teachers]; () for a single teacher."""
    if not kd.teachers:
        return ()
    raw = list(kd.teacher_weights) or [1.0] * (1 + len(kd.teachers))
    total = sum(raw)
    return tuple(w / total for w in raw)
