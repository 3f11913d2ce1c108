"""The reload drop check: which (running, new) pairs of route/upstream counts are refused."""

from __future__ import annotations

import pytest

from gateway.app import drop_problems
from gateway.config import load_config_text


def config_text(routes: int, upstreams: int, ratio: float | None = None) -> str:
    lines = ["upstreams:"]
    lines += [f"  u{i}: {{instances: ['127.0.0.1:{9000 + i}']}}" for i in range(upstreams)]
    if upstreams == 0:
        lines[0] = "upstreams: {}"
    lines.append("routes:" if routes else "routes: []")
    lines += [
        f"  - {{name: r{i}, upstream: u0, match: {{path: {{prefix: /r{i}}}}}}}"
        for i in range(routes)
    ]
    if ratio is not None:
        lines.append(f"reload: {{refuse_drop_ratio: {ratio}}}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("before", "after", "ratio", "refused"),
    [
        # (routes, upstreams) running -> new
        ((4, 2), (4, 2), None, []),
        ((4, 2), (3, 2), None, []),  # one of four routes: a normal edit
        ((4, 2), (2, 2), None, ["routes"]),  # half the routes vanished
        ((4, 2), (0, 1), None, ["routes", "upstreams"]),
        ((4, 2), (8, 3), None, []),  # growing is never refused
        ((3, 1), (2, 1), None, []),  # 33% < 50%
        ((1, 1), (0, 1), None, ["routes"]),  # the only route: 100%
        ((0, 1), (0, 1), None, []),  # nothing to drop
        ((4, 2), (3, 2), 0.25, ["routes"]),  # 25% >= 25%
        ((4, 2), (1, 2), 1.0, []),  # 75% < 100%
        ((4, 2), (0, 1), 1.0, ["routes"]),
    ],
)
def test_drop_check(
    before: tuple[int, int], after: tuple[int, int], ratio: float | None, refused: list[str]
) -> None:
    # The running config's ratio applies; the new file's says nothing.
    running = load_config_text(config_text(*before, ratio), "old.yaml")
    new = load_config_text(config_text(*after, 0.99), "new.yaml")
    problems = drop_problems(running, new)
    assert [p.path for p in problems] == refused
    for problem in problems:
        assert problem.file == "new.yaml" and problem.line is not None
        assert "gateway reload --force" in problem.message
