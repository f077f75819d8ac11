"""The package's one logger: ``[component] message``, printed by rank 0 only."""

from __future__ import annotations

from megatron_grow.log import component_log


def test_a_component_log_prefixes_its_name_in_a_plain_process(capsys):
    component_log("grow")("loaded the source")
    component_log("train")("done")
    assert capsys.readouterr().out == "[grow] loaded the source\n[train] done\n"


def test_only_rank_0_prints(capsys, monkeypatch):
    from megatron_grow.parallel import collectives

    monkeypatch.setattr(collectives, "rank", lambda: 1)  # what torch.distributed.get_rank() says on rank 1
    component_log("grow")("not on rank 1")
    assert capsys.readouterr().out == ""
