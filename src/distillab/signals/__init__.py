"""Teacher signals beyond one same-tokenizer teacher's full or top-K distribution.

    sampling.py        token ids drawn from a teacher per position, importance-weighted: an
                       unbiased estimate of the forward-KL gradient (online, and the `sampled`
                       cache coding)
    cross_tokenizer.py a teacher with another tokenizer: the two tokenizations of a window aligned
                       by byte spans, for the ULD and ALM divergences
    several.py         k teachers at once: a weighted mixture of their distributions, or each
                       document routed to one teacher
    checks.py          the config keys' checks
    describe.py        one line naming the signal a student saw (results.csv, the report)

All of them are `TeacherSignal`s (`distillab.teacher`): the training loop calls `signal(batch)`
and hands the result to the one loss.
"""
