"""Training data: the prompt datasets of the train YAML and the eval YAML, the SFT-aux image-caption
pairs, and the prompt sampler that deals prompts to ranks.

- `prompts`: the train and eval YAMLs and the prompt files they name;
- `sftaux`: the SFT auxiliary loss's image-caption data and its loader;
- `prompt_sampler`: which prompts each rank generates at each step (resumable).

May import `config` and the levels below it (`model`, `algorithms`).
"""
