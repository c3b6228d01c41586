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


def test_mi_histogram_keeps_the_extremes_and_counts_whole_candidates():
    """The selected best image was missing from mi_hist.png: float32 bin edges ended below the float64
    maximum. Edges are float64 now, every candidate lands in a bin, and the count axis has whole numbers."""
    import numpy as np

    from mitune.rounds.plots import histogram_bins

    z = torch.tensor([-0.7, -0.3, 0.1, 0.7], dtype=torch.float64)
    float32_edges = torch.linspace(z.min().item(), z.max().item(), 30).tolist()
    assert np.histogram(z.numpy(), bins=float32_edges)[0].sum() < 4  # the old edges drop the extremes
    assert np.histogram(z.numpy(), bins=histogram_bins(z))[0].sum() == 4
    mi = torch.tensor([1.0, 2.0, 3.0, 9.7, 0.5, 0.9, 1.3, 4.4], dtype=torch.float64)
    prompt_ids, chosen = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 0, 0, 1, 0, 0, 0, 1]).bool()
    relative = plot_mi(mi, prompt_ids, chosen, "t").axes[0]
    heights = [patch.get_height() for patch in relative.patches]
    assert sum(heights) == len(mi) and all(h == int(h) for h in heights)
    selected_bars = relative.containers[1]
    assert sum(bar.get_height() for bar in selected_bars) == 2  # both selected maxima are drawn
    assert all(tick == int(tick) for tick in relative.get_yticks())
