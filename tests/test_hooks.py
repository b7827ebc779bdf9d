"""fedlit.hooks: one dispatcher for every hook, independent of Lightning's `fabric.call`."""

import pytest

from fedlit.hooks import call, call_all, defines


class Partial:
    def __init__(self):
        self.seen = []

    def on_round_end(self, round, metrics):
        self.seen.append((round, dict(metrics)))

    def select_layers(self, round):
        return ["fc"] if round % 2 else None


class Everything:
    def on_round_end(self, **kwargs):
        self.kwargs = kwargs


def test_a_hook_gets_only_the_arguments_it_names_and_queries_return_answers():
    partial, everything, silent = Partial(), Everything(), object()
    answers = call_all(
        [partial, everything, silent], "on_round_end", round=3, metrics={"a": 1}, clients=[1]
    )
    assert answers == [None, None, None]
    assert partial.seen == [(3, {"a": 1})]
    assert everything.kwargs == {"round": 3, "metrics": {"a": 1}, "clients": [1]}
    assert call(partial, "select_layers", round=3, layers=["stem", "fc"]) == ["fc"]
    assert call(silent, "select_layers", round=3) is None
    assert defines(partial, "select_layers") and not defines(silent, "select_layers")


def test_a_hook_missing_a_required_argument_fails_loudly():
    class Needs:
        def on_client_end(self, client, model):
            pass

    with pytest.raises(TypeError, match="model"):
        call(Needs(), "on_client_end", client=1)


def test_the_engine_dispatches_without_lightnings_callback_machinery(tmp_path):
    """Callbacks are never handed to Fabric: keyword filtering of `fabric.call` arrived in
    Lightning 2.6, and fedlit must not depend on it."""
    from functools import partial

    from fedlit.engine import prepare
    from fedlit.models import CNN
    from runs import tiny_run

    fed = prepare(tiny_run(tmp_path, model=partial(CNN, padding=2), callbacks=[Partial()]))
    assert fed.fabric._callbacks == []
