"""The study: what a sweep's runs say about the findings.

`results` (one row per run, paired gains, relationship labels), `stats` (fixed-n intervals),
`sequential` (the group-sequential design), `verdicts` (the fixed rule per finding),
`adaptive` (which seeds bring an open finding to its next look) and `demo` (the demo's studies
and their rounds of seeds), `scaling` (the demo's study repeated over student sizes), `law`
(the fitted distillation law), `validation` (the law against naive predictors) and `planner`
(`distillab plan`). `distillab.report` renders what they decide."""
