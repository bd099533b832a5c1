"""Error-landscape analyses of Paul et al. (ICLR 2023) over IMP archives (torch).

`lmc`: linear mode connectivity between successive rounds; `hessian`: the sharpness of each
round's minimum; `archive`: rounds of any archive the scanner reads, as model state dicts.
"""
