"""distillab's paper settings against the paper authors' own code (github.com/TaiMingLu/maxtext-distillation,
a JAX MaxText fork), each recomputed here in float64 from the authors' definitions, with the file and
function named in the test's docstring:

    top-k         MaxText/max_utils.py: kl_divergence_between_logits (the student over the whole vocabulary)
                  and kl_divergence_between_logits_efficient (the student renormalised over the same k),
                  mixed as MaxText/train.py: kd_loss_fn does ((1 - a) CE + a T^2 mean KL over target tokens)
    weight decay  MaxText/optimizers.py: get_optimizer (optax.adamw, no mask: every parameter decays)
    init          MaxText/layers/{models,attentions,linears,initializers}.py
    attention     MaxText/layers/attentions.py: Attention.__call__ / query_projection / AttentionOp.apply_attention,
                  MaxText/layers/qwen3.py (query_pre_attn_scalar), MaxText/layers/embeddings.py (RoPE)
"""

import math

import pytest
import torch

from distillab.losses import distillation_loss, sparse_distillation_loss
from distillab.losses.teacher_rows import truncate_dense


# ----------------------------------------------------------------------------- top-k, the authors' two KLs


def authors_kl(student, teacher, temperature, top_k):
    """MaxText/max_utils.py: kl_divergence_between_logits(student, teacher, T, top_k) in float64:
    both sides log-softmaxed at T over the vocabulary; the teacher's probabilities masked to its top k
    and renormalised; KL = sum p_renorm (log p_renorm - log q_full)."""
    log_q = torch.log_softmax(student / temperature, dim=-1)
    p_full = torch.softmax(teacher / temperature, dim=-1)
    index = torch.topk(p_full, top_k, dim=-1).indices
    mask = torch.zeros_like(p_full).scatter(-1, index, 1.0)
    masked = p_full * mask
    renorm = masked / masked.sum(-1, keepdim=True)
    log_renorm = torch.log(torch.clamp(renorm, min=torch.finfo(renorm.dtype).tiny))
    return (renorm * (log_renorm - log_q)).sum(-1)


def authors_kl_efficient(student, teacher, temperature, top_k):
    """MaxText/max_utils.py: kl_divergence_between_logits_efficient(student, teacher, T, top_k) in float64
    (the renormalisation path, use_other_bucket=False): top k of the teacher's logits / T; log-softmax of
    the teacher over those k logits and of the student over its logits at the same k ids."""
    t, s = teacher / temperature, student / temperature
    top_t, index = torch.topk(t, top_k, dim=-1)
    log_p = torch.log_softmax(top_t, dim=-1)
    log_q = torch.log_softmax(s.gather(-1, index), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def authors_loss(student, teacher, labels, alpha, temperature, kl):
    """MaxText/train.py: kd_loss_fn: (1 - a) * CE + a * T^2 * (sum of KL over target tokens / their count)."""
    valid = labels >= 0
    log_q = torch.log_softmax(student, dim=-1)
    ce = -(log_q.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * valid).sum() / valid.sum()
    kd = (kl * valid).sum() / valid.sum() * temperature**2
    return (1 - alpha) * ce + alpha * kd


def top_k_inputs(seed=0, rows=7, vocab=23):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[2] = -100
    return student, teacher, labels


@pytest.mark.parametrize("definition, authors", [("full", authors_kl), ("renormalised", authors_kl_efficient)])
@pytest.mark.parametrize("top_k, temperature, alpha", [(1, 1.0, 1.0), (3, 1.0, 0.5), (5, 2.0, 0.2), (10, 0.5, 1.0)])
def test_both_top_k_definitions_equal_the_authors_functions(definition, authors, top_k, temperature, alpha):
    """kd.top_k_student: full = MaxText/max_utils.py: kl_divergence_between_logits; renormalised =
    kl_divergence_between_logits_efficient (which MaxText/EFFICIENT_TOPK_KD.md and
    MaxText/HARD_LABELS_VS_TOPK.md say MaxText/train.py: kd_loss_fn switched to). Loss and gradient
    against the float64 recomputation, dense and cached (top-K rows) teachers alike."""
    student, teacher, labels = top_k_inputs()
    reference = student.clone().requires_grad_(True)
    expected = authors_loss(reference, teacher, labels.where(labels != -100, torch.tensor(-1)), alpha, temperature,
                            authors(reference, teacher, temperature, top_k))
    expected.backward()
    mine = student.clone().requires_grad_(True)
    out = distillation_loss(mine, teacher, labels, alpha=alpha, temperature=temperature, top_k=top_k,
                            top_k_student=definition)
    out.total.backward()
    assert float(out.total.detach()) == pytest.approx(float(expected.detach()), abs=1e-10)
    assert torch.allclose(mine.grad, reference.grad, atol=1e-10)
    rows = truncate_dense(teacher, top_k, None)  # what a teacher cache holds
    cached = student.clone().requires_grad_(True)
    sparse = sparse_distillation_loss(cached, rows.indices, rows.logprobs, rows.log_tail, labels, alpha=alpha,
                                      temperature=temperature, top_k=top_k, top_k_student=definition)
    sparse.total.backward()
    assert float(sparse.total.detach()) == pytest.approx(float(expected.detach()), abs=1e-10)
    assert torch.allclose(cached.grad, reference.grad, atol=1e-10)


def test_the_two_definitions_differ_by_the_students_log_mass_on_the_kept_tokens():
    """full - renormalised = -log(sum of the student's probability over the teacher's top k), per token
    (MaxText/max_utils.py: the two KL functions); at k = 1 the renormalised KL is identically 0."""
    student, teacher, _ = top_k_inputs(seed=3)
    for k in (1, 2, 6):
        index = torch.topk(teacher, k, dim=-1).indices
        mass = torch.softmax(student, dim=-1).gather(-1, index).sum(-1)
        gap = authors_kl(student, teacher, 1.0, k) - authors_kl_efficient(student, teacher, 1.0, k)
        assert torch.allclose(gap, -torch.log(mass), atol=1e-12)
    assert torch.allclose(authors_kl_efficient(student, teacher, 1.0, 1), torch.zeros(len(student), dtype=torch.float64))


# ----------------------------------------------------------------------------- weight decay


def optax_adamw_steps(params, grads_per_step, lr, b1, b2, eps, weight_decay, decays):
    """MaxText/optimizers.py: get_optimizer -> optax.adamw(lr, b1, b2, eps, eps_root=0, weight_decay) with
    no mask, in float64: optax.chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate).
    `decays(name)` says which parameters add_decayed_weights touches (all of them without a mask)."""
    params = {name: p.clone() for name, p in params.items()}
    mu = {name: torch.zeros_like(p) for name, p in params.items()}
    nu = {name: torch.zeros_like(p) for name, p in params.items()}
    for count, grads in enumerate(grads_per_step, start=1):
        for name, g in grads.items():
            mu[name] = b1 * mu[name] + (1 - b1) * g
            nu[name] = b2 * nu[name] + (1 - b2) * g * g
            update = (mu[name] / (1 - b1**count)) / (torch.sqrt(nu[name] / (1 - b2**count)) + eps)
            if decays(name):
                update = update + weight_decay * params[name]
            params[name] = params[name] - lr * update
    return params


@pytest.mark.parametrize("grouping", ["all", "matrices"])
def test_weight_decay_grouping_equals_optax_adamw(grouping):
    """train.weight_decay_params: all = MaxText/optimizers.py: get_optimizer's optax.adamw (no mask: norms
    decay too); matrices (distillab's default) exempts 1-D parameters. Two steps against float64."""
    from distillab.config import TrainConfig
    from distillab.models import LADDER, build_model
    from distillab.train.schedule import make_optimizer

    model = build_model(LADDER["cpu-7k"], 64, 16, seed=1).double()
    train = TrainConfig(lr=0.01, weight_decay=0.1, weight_decay_params=grouping)
    optimizer = make_optimizer(model, train)
    named = dict(model.named_parameters())
    start = {name: p.detach().clone() for name, p in named.items()}
    g = torch.Generator().manual_seed(5)
    steps = [{name: torch.randn(p.shape, generator=g, dtype=torch.float64) for name, p in named.items()}
             for _ in range(2)]
    for grads in steps:
        for name, p in named.items():
            p.grad = grads[name].clone()
        optimizer.step()
    decays = (lambda name: True) if grouping == "all" else (lambda name: named[name].dim() >= 2)
    expected = optax_adamw_steps(start, steps, 0.01, train.beta1, train.beta2, train.eps, 0.1, decays)
    norms = [name for name in named if named[name].dim() == 1]
    assert norms  # the model has norms, so the two groupings differ
    for name, p in named.items():
        assert torch.allclose(p.detach(), expected[name], rtol=0, atol=1e-12), name
    moved = [float((named[n].detach() - start[n]).abs().max()) for n in norms]
    assert min(moved) > 0


# ----------------------------------------------------------------------------- the MaxText parametrisation


def maxtext_rms_norm(x, scale, eps):
    """MaxText/layers/normalizations.py: RMSNorm.__call__."""
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * scale


def maxtext_rope(x, positions, max_timescale, interleaved):
    """MaxText/layers/embeddings.py: RotaryEmbedding.__call__ (half-split pairs, Qwen3) and
    LLaMARotaryEmbedding.__call__ (interleaved pairs (2i, 2i+1), Llama 3.1; no llama3.1 scaling:
    rope_use_scale is False in MaxText/configs/base.yml). x [b, s, heads, hd]."""
    hd = x.shape[-1]
    fraction = 2 * torch.arange(hd // 2, dtype=torch.float64) / hd
    timescale = max_timescale ** fraction
    angle = positions[:, :, None, None].double() / (timescale.repeat_interleave(2) if interleaved else timescale)
    if interleaved:
        shifted = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).reshape(x.shape)  # sign (-1, 1) per pair
        return x * torch.cos(angle) + shifted * torch.sin(angle)
    first, second = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([first * torch.cos(angle) - second * torch.sin(angle),
                      second * torch.cos(angle) + first * torch.sin(angle)], dim=-1)


def maxtext_attention(x, positions, attention, config, family):
    """MaxText/layers/attentions.py: Attention.__call__ in float64 with the HF layer's weights laid out as
    MaxText's kernels: query_projection / kv_projection, qk-norm (Qwen3), RoPE, query_pre_attn_scalar
    = head_dim^-0.5 (MaxText/layers/qwen3.py), AttentionOp.apply_attention's query * 1/sqrt(head_dim),
    causal softmax of q.k (no further scale: the splash / dot-product kernels take scale 1), out_projection.
    Llama's interleaved RoPE takes the HF query / key channels permuted (HF pair (i, i + hd/2) -> (2i, 2i + 1))."""
    heads, kv_heads, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    perm = torch.arange(hd).reshape(2, hd // 2).T.reshape(-1) if family == "llama" else torch.arange(hd)

    def kernel(linear, n):  # HF [n * hd, d] -> MaxText [d, n, hd] (channels permuted for RoPE)
        return linear.weight.detach().double().reshape(n, hd, -1)[:, perm].permute(2, 0, 1)

    q = torch.einsum("bsd,dnh->bsnh", x, kernel(attention.q_proj, heads))
    k = torch.einsum("bsd,dnh->bsnh", x, kernel(attention.k_proj, kv_heads))
    v = torch.einsum("bsd,dnh->bsnh", x, attention.v_proj.weight.detach().double().reshape(kv_heads, hd, -1)
                     .permute(2, 0, 1))
    if family == "qwen3":
        q = maxtext_rms_norm(q, attention.q_norm.weight.detach().double()[perm], config.rms_norm_eps)
        k = maxtext_rms_norm(k, attention.k_norm.weight.detach().double()[perm], config.rms_norm_eps)
    theta = config.rope_parameters["rope_theta"] if hasattr(config, "rope_parameters") else config.rope_theta
    q, k = (maxtext_rope(t, positions, theta, family == "llama") for t in (q, k))
    if family == "qwen3":
        q = q * hd**-0.5  # query_pre_attn_scalar
    q = q / math.sqrt(hd)  # AttentionOp.apply_attention
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    logits = torch.einsum("bqnh,bknh->bnqk", q, k)
    s = x.shape[1]
    logits = logits.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
    out = torch.einsum("bnqk,bknh->bqnh", torch.softmax(logits, dim=-1), v)
    wo = attention.o_proj.weight.detach().double().T.reshape(heads, hd, -1)
    return torch.einsum("bqnh,nhd->bqd", out, wo)


def tiny_spec(family):
    from distillab.models import ModelSpec

    return ModelSpec("tiny-" + family, family, 2, 32, 4, 2, 8, 48, 500_000.0 if family == "llama" else 1e6,
                     family == "qwen3", norm_eps=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_maxtext_attention_equals_the_authors(family):
    """model.parametrisation: maxtext: every layer's attention output equals the authors' attention
    (MaxText/layers/attentions.py: Attention.__call__, AttentionOp.apply_attention; MaxText/layers/qwen3.py)
    recomputed in float64 from the same weights; the hf parametrisation of Qwen3 does not (it scales by
    1/sqrt(head_dim) once)."""
    from distillab.models import apply_parametrisation, build_model

    model = build_model(tiny_spec(family), 50, 16, seed=3, parametrisation="maxtext").double().eval()
    captured = []
    hooks = [layer.self_attn.register_forward_hook(
        lambda module, args, kwargs, output: captured.append((module, kwargs["hidden_states"], output[0])),
        with_kwargs=True) for layer in model.model.layers]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (2, 9), generator=g)
    positions = torch.arange(9).repeat(2, 1)
    with torch.no_grad():
        model(input_ids=ids, position_ids=positions)
    for hook in hooks:
        hook.remove()
    for module, hidden, output in captured:
        expected = maxtext_attention(hidden, positions, module, model.config, family)
        assert torch.allclose(output, expected, atol=1e-10), family
    apply_parametrisation(model, "hf")  # no-op for hf: rebuild the Qwen3 scale transformers uses
    for layer in model.model.layers:
        layer.self_attn.scaling = layer.self_attn.head_dim ** -0.5
    captured.clear()
    hooks = [layer.self_attn.register_forward_hook(
        lambda module, args, kwargs, output: captured.append((module, kwargs["hidden_states"], output[0])),
        with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids, position_ids=positions)
    same = [torch.allclose(o, maxtext_attention(h, positions, m, model.config, family), atol=1e-10)
            for m, h, o in captured]
    assert all(same) if family == "llama" else not any(same)


def test_an_exported_maxtext_qwen3_model_gives_the_same_logits(tmp_path):
    """The MaxText Qwen3 attention scale (1/head_dim) is folded into the query norms' weights when the
    HF model is written (`distillab.export`, as final/ is), so `from_pretrained` (transformers' own
    1/sqrt(head_dim)) gives the training model's logits."""
    from distillab.export import export_model
    from distillab.models import build_model, load_causal_lm, query_norm_factors

    model = build_model(tiny_spec("qwen3"), 50, 16, seed=4, parametrisation="maxtext").eval()
    with torch.no_grad():
        for layer in model.model.layers:  # trained query norms are not all ones
            layer.self_attn.q_norm.weight.mul_(torch.rand(layer.self_attn.q_norm.weight.shape) + 0.5)
    factors = query_norm_factors(model, "maxtext")
    assert factors and all(f == pytest.approx(8**-0.5) for f in factors.values())
    export_model(tmp_path / "model", model, None, {}, lambda t: t.detach().cpu(), write=True, factors=factors)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        loaded = load_causal_lm(tmp_path / "model", "cpu")(input_ids=ids).logits
    assert torch.allclose(loaded, expected, atol=1e-5)
    assert query_norm_factors(build_model(tiny_spec("llama"), 50, 16, seed=4, parametrisation="maxtext"),
                              "maxtext") == {}  # Llama's forward is already HF's


def test_a_maxtext_qwen3_run_resumes_exactly(tmp_path, cache_dir):
    """Step checkpoints hold the weights as trained (final/ the folded ones): a run stopped at step 3
    and resumed ends with the uninterrupted run's weights, bit for bit."""
    from safetensors.torch import load_file

    from conftest import tiny_run
    from distillab.config import config_from_dict
    from distillab.train import train

    def config(name):
        return config_from_dict(tiny_run(tmp_path, cache_dir, name, model={
            "name": "cpu-0.1m", "family": "qwen3", "parametrisation": "maxtext"}, train={"threads": 1}))

    quiet = lambda *a, **k: None  # noqa: E731
    whole = train(config("whole"), log=quiet)
    train(config("resumed"), stop_after_steps=3, log=quiet)
    resumed = train(config("resumed"), log=quiet)
    a, b = load_file(whole.final_dir / "model.safetensors"), load_file(resumed.final_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_maxtext_qwen3_runs_hf_models_give_the_trained_logits(tmp_path, cache_dir):
    """final/ (written from the live model) and `distillab export` of a sharded step checkpoint (the
    weights as trained) fold the query-norm factors: `from_pretrained` of each gives the logits of the
    trained model under the MaxText attention scale."""
    from conftest import tiny_run
    from distillab.checkpoint import step_dir
    from distillab.config import config_from_dict
    from distillab.export import checkpoint_tensors, export_checkpoint
    from distillab.models import build_model, load_causal_lm
    from distillab.train.parallel import SingleProcess
    from distillab.train.rundir import RunDirectory
    from distillab.train.trainer import Trainer

    quiet = lambda *a, **k: None  # noqa: E731
    config = config_from_dict(tiny_run(tmp_path, cache_dir, "live", model={
        "name": "cpu-0.1m", "family": "qwen3", "parametrisation": "maxtext"}, train={"threads": 1}))
    run = RunDirectory(config)
    trainer = Trainer.build(config, SingleProcess(torch.device("cpu")), quiet)
    with run.claim(True):
        trainer.restore(run)
        run.record_config(True, trainer.spec.name)
        result = trainer.fit(run)
    ids = torch.randint(0, trainer.data.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    model = trainer.model.eval()
    assert model.model.layers[0].self_attn.scaling == pytest.approx(1 / model.config.head_dim)
    with torch.no_grad():
        assert torch.allclose(load_causal_lm(result.final_dir, "cpu")(input_ids=ids).logits,
                              model(input_ids=ids).logits, atol=1e-5)
        as_trained = build_model(trainer.spec, trainer.data.vocab_size, 32, seed=0, parametrisation="maxtext").eval()
        as_trained.load_state_dict(dict(checkpoint_tensors(step_dir(run.checkpoints, 6))), strict=False)
        exported = load_causal_lm(export_checkpoint(result.run_dir, 6, log=quiet), "cpu")
        assert torch.allclose(exported(input_ids=ids).logits, as_trained(input_ids=ids).logits, atol=1e-5)


def test_the_new_keys_leave_existing_run_ids_alone():
    """model.parametrisation, train.weight_decay_params and kd.top_k_student enter a run's identity only
    when set away from their defaults (keys outside config.ORIGINAL_KEYS), so every published run id stays."""
    from distillab.config import RunConfig, config_from_dict, results_config
    from distillab.files import stable_hash

    new = ("model.parametrisation", "train.weight_decay_params", "kd.top_k_student")
    plain = results_config(RunConfig())
    assert not set(new) & set(plain)
    changed = results_config(config_from_dict({"model": {"parametrisation": "maxtext"},
                                               "train": {"weight_decay_params": "all"},
                                               "kd": {"teacher": "t", "alpha": 0.5, "top_k": 4,
                                                      "top_k_student": "renormalised"}}))
    assert set(new) <= set(changed) and stable_hash(changed) != stable_hash(plain)
