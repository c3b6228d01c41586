"""Prompts: prompt files and T2I-CompBench categories, noun phrases, DiffusionDB. The configs'
``_target_``s name the loaders through this package."""

from mitune.prompts.sources import PromptSet, load_compbench, load_prompts, read_prompt_file

__all__ = ["PromptSet", "load_compbench", "load_prompts", "read_prompt_file"]
