"""RLHF on causal language models: tokenizers/models, generation, rewards, data, PPO.

Kept light on purpose: importing ``proxrl.lm`` imports neither torch nor transformers. Import the submodules
(``proxrl.lm.loading``, ``proxrl.lm.generation``, ``proxrl.lm.rewards``, ``proxrl.lm.data``, ...) directly.
"""
