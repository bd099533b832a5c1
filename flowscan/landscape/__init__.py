"""Error-landscape analyses of Paul et al. (ICLR 2023) over IMP archives (torch).

`analysis`: the lmc, sharpness and probe tables (the linear path itself is `train.lmc`);
`hessian`: the sharpness of each round's minimum; `archive`: rounds of any archive the scanner
reads, as model state dicts; `recipes`: the model, data and preprocessing an archive was trained with.
"""
