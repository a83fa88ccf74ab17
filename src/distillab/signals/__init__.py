"""Teacher signals beyond one same-tokenizer teacher's full or top-K distribution.

    sampling.py        token ids drawn from a teacher per position, importance-weighted: an
                       unbiased estimate of the forward-KL gradient (online, and the `sampled`
                       cache coding)
    cross_tokenizer.py a teacher with another tokenizer: the two tokenizations of a window aligned
                       by byte spans, for the ULD and ALM divergences
    several.py         k teachers at once: a weighted mixture of their distributions, or each
                       document routed to one teacher
    describe.py        one line naming the signal a student saw (results.csv, the report)
    build.py           the one factory the training loop calls (`build_signal`)

Their config keys are checked with the rest of the kd section: the objective's own
(kd.samples, kd.proposal_temperature, kd.teacher_weights, kd.teacher_mix, the cross-tokenizer
divergences) by `distillab.losses.objective.check_objective`, the teachers and caches a run
names by `distillab.config.validate_kd`.

All of them are `TeacherSignal`s (`distillab.teacher`): the training loop calls `signal(batch)`
and hands the result to the one loss.
"""
