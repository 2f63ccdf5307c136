"""Gymnasium environments over autoprune's core.

`autoprune/ChannelPruning-v1` is registered when this package is imported, with a lazy
entry point, as Gymnasium's own environment packages do:

    import gymnasium as gym
    import autoprune.envs
    env = gym.make("autoprune/ChannelPruning-v1", evaluator=..., budget=parse_budget("50%flops"))
"""

import gymnasium as gym

ENV_ID = "autoprune/ChannelPruning-v1"

if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="autoprune.envs.channel_pruning:ChannelPruningEnv", disable_env_checker=True)
