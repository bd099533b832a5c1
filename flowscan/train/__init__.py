"""The torch layer that the producer and the landscape analyses share: models (flowscan's and
other code bases' zoos, `models`, `zoo`), datasets and recipes' preprocessing (`data`), one round
of training under a mask (`trainer`), and evaluation, BatchNorm re-estimation and the linear
path between two networks (`lmc`). It imports nothing from `produce` or `landscape`.
"""
