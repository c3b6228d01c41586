"""A round's MI plot: selected vs not, relative to each prompt and raw."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mitune.rounds.settings import GenerationConfig
from mitune.runs.artifacts import finished


def describe(generation: GenerationConfig) -> str:
    return f"M={generation.num_candidates}, k={generation.top_k}, CFG {generation.guidance_scale:g}"


def per_prompt_z(mi: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
    """MI relative to the other candidates of its prompt: (MI - prompt mean) / prompt std (0 where constant).

    Selection is per prompt, and MI levels differ between prompts, so pooled raw MI would show
    selected images below unselected ones of other prompts.
    """
    z = torch.zeros(len(mi), dtype=torch.float64)
    for pid in prompt_ids.unique():
        mine = prompt_ids == pid
        values = mi[mine].double()
        std = values.std() if len(values) > 1 else torch.tensor(0.0)
        z[mine] = (values - values.mean()) / std if std > 0 else 0.0
    return z


def histogram_bins(values: torch.Tensor, bins: int = 30) -> np.ndarray:
    """Bin edges in float64 from the values' own minimum to maximum: float32 edges can end below the
    float64 maximum and drop it (the selected best candidate is often that maximum)."""
    return np.histogram_bin_edges(values.double().numpy(), bins=bins if values.max() > values.min() else 10)


def plot_mi(mi: torch.Tensor, prompt_ids: torch.Tensor, chosen: torch.Tensor, title: str) -> Figure:
    """Left: MI relative to each prompt, selected vs not; right: raw MI per prompt, selected highlighted."""
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    relative, raw = figure.subplots(1, 2)
    z = per_prompt_z(mi, prompt_ids)
    bins = histogram_bins(z)
    relative.hist(z[~chosen].numpy(), bins=bins, alpha=0.6, label="not selected")
    relative.hist(z[chosen].numpy(), bins=bins, alpha=0.8, label="selected (top-k)")
    relative.set(xlabel="MI relative to its prompt (z-score)", ylabel="candidates")
    relative.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 0.5 candidates
    relative.legend(fontsize=8)
    raw.scatter(prompt_ids[~chosen].tolist(), mi[~chosen].tolist(), s=6, color="0.6", label="not selected")
    raw.scatter(prompt_ids[chosen].tolist(), mi[chosen].tolist(), s=14, color="C1", label="selected (top-k)")
    raw.set(xlabel="prompt", ylabel="point-wise MI (nats)")
    raw.xaxis.set_major_locator(MaxNLocator(integer=True))
    raw.legend(fontsize=8)
    figure.suptitle(title)
    return figure


def plot_round(rows: list[dict], title: str) -> Figure:
    """``plot_mi`` of a selected round's rows (the finished candidates: a pruned one's MI is partial)."""
    rows = finished(rows)
    mi = torch.tensor([row["mi"] for row in rows])
    chosen = torch.tensor([row["selected"] for row in rows])
    prompt_ids = torch.tensor([row["prompt_id"] for row in rows])
    return plot_mi(mi, prompt_ids, chosen, title)
