"""`make demo`: its three commands compose as a user would type them (the run itself: README's measured figure)."""

from __future__ import annotations

import shlex
from pathlib import Path

from hydra import compose, initialize_config_dir

import mitune.config
from mitune import demo
from mitune.config import typed
from mitune.rounds.settings import GenerationConfig
from tests.test_readme import jobs

mitune.config.register()
CONF = Path(__file__).resolve().parents[1] / "conf"


def test_the_demo_trains_two_rounds_and_evaluates_rounds_0_to_2_over_a_cfg_grid(tmp_path):
    (_, train), (_, evaluate), (_, summary) = demo.commands(tmp_path)
    assert train[:2] == ["-m", "mitune.run"] and evaluate[:3] == ["-m", "mitune.evaluate", "-m"]
    grid = jobs([*evaluate[3:], *(f"{k}={','.join(v)}" for k, v in demo.grid().items())])
    assert len(grid) == 9
    with initialize_config_dir(str(CONF), version_base="1.3"):
        trained = compose("config", overrides=train[2:])
        assert trained.rounds == 2 and trained.model.path_or_id.endswith("toy-model")
        points = set()
        for job in grid:
            cfg = compose("evaluate", overrides=job)
            assert cfg.run_dir == str(tmp_path / "run") and list(cfg.eval.quality) == ["toy_fd"]
            assert list(cfg.eval.alignment) == ["toy_oracle"]
            points.add((cfg.eval.round, typed(cfg.generation, GenerationConfig, "generation").guidance_scale))
    assert {r for r, _ in points} == {0, 1, 2} and min(g for _, g in points) < 3 and max(g for _, g in points) == 7.5
    assert summary[-4:] == ["--cfg", *demo.CFGS] and shlex.join(summary).count(str(tmp_path / "eval")) == 1
