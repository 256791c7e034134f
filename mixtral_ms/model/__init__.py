"""The model core: config (configuration.py, its field table schema.py), router, capacity, dispatch, experts
(moe.py, int8 experts included; the int8 format is int8.py), the decoder (modeling.py) and losses.
Nothing here knows about parallelism, checkpoints on disk or the trainer."""
