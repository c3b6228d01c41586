"""The round plot reads right (MI relative to each prompt, the round's settings in the title); device figures."""

from __future__ import annotations

import torch

from mitune.rounds.callbacks import device_stats
from mitune.rounds.plots import describe, per_prompt_z, plot_mi
from mitune.rounds.settings import GenerationConfig


def test_selected_candidates_stand_above_their_prompt_whatever_its_mi_level():
    # Prompt 1's worst candidate has more MI than prompt 0's best: pooled raw MI would mix them up.
    mi = torch.tensor([1.0, 2.0, 3.0, 10.0, 11.0, 15.0])
    prompt_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    chosen = torch.tensor([False, False, True, False, False, True])
    z = per_prompt_z(mi, prompt_ids)
    assert z[chosen].min() > z[~chosen].max()
    torch.testing.assert_close(z[:3], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    assert z[3:].mean().abs() < 1e-12 and torch.isclose(z[3:].std(), torch.tensor(1.0, dtype=torch.float64))


def test_constant_or_single_candidate_prompts_have_zero_relative_mi():
    z = per_prompt_z(torch.tensor([4.0, 4.0, 7.0]), torch.tensor([0, 0, 1]))
    assert z.tolist() == [0.0, 0.0, 0.0]


def test_plot_title_names_m_k_and_cfg():
    title = f"round 2: {describe(GenerationConfig(num_candidates=16, top_k=2, guidance_scale=7.5))}"
    assert title == "round 2: M=16, k=2, CFG 7.5"
    figure = plot_mi(torch.tensor([1.0, 2.0, 5.0, 6.0]), torch.tensor([0, 0, 1, 1]),
                     torch.tensor([False, True, False, True]), title)
    assert figure.get_suptitle() == title
    relative, raw = figure.axes
    assert relative.get_xlabel() == "MI relative to its prompt (z-score)" and raw.get_xlabel() == "prompt"


def test_device_stats_keep_memory_and_load_out_of_the_accelerators_many_figures():
    cuda = {"allocated_bytes.all.current": 2e9, "allocated_bytes.all.peak": 3e9, "active.all.freed": 7, "num_ooms": 0}
    assert device_stats(cuda) == {"device/memory_gb": 2.0, "device/peak_memory_gb": 3.0}
    cpu = {"cpu_percent": 0.0, "cpu_vm_percent": 41.5, "cpu_swap_percent": 0.0}
    assert device_stats(cpu) == {"device/cpu_percent": 0.0, "device/ram_percent": 41.5}
