"""Algorithm 1: generation rounds, selection, the fine-tuning set and module, and the round loop
(``mitune.rounds.loop``). The only package that trains with Lightning."""
