"""The sum of the workers' reports: stage ids keep late counts out, exits lose nothing."""

from __future__ import annotations

from rollout.evidence import StageCounts, WindowCounts
from rollout.summed import ArmReport, SummedEvidence, WorkerReport


def report(stage_id: int, *, requests: int, errors: int = 0, total: int | None = None) -> WorkerReport:
    total = requests if total is None else total
    arm = ArmReport(
        stage=StageCounts(requests=requests, errors=errors),
        window=WindowCounts(requests=requests, errors=errors, bins=(requests,) + (0,) * 60),
        code_totals=(total - errors, 0, 0, errors, 0),
        latency_sum=0.01 * total,
        inflight=1,
    )
    return WorkerReport(stage_id=stage_id, arms={"baseline": ArmReport(), "canary": arm})


def test_the_decision_sees_the_sum_of_every_worker():
    evidence = SummedEvidence()
    evidence.receive(0, report(0, requests=30, errors=3))
    evidence.receive(1, report(0, requests=50, errors=7))
    assert evidence.stage_counts()["canary"] == StageCounts(requests=80, errors=10)
    snapshot = evidence.snapshot(0.0)["canary"]
    assert (snapshot.requests, snapshot.errors, snapshot.inflight) == (80, 10, 2)
    assert evidence.arms["canary"].code_totals == (70, 0, 0, 10, 0)


def test_a_late_report_for_an_earlier_stage_never_counts_toward_the_new_one():
    stages: list[int] = []
    evidence = SummedEvidence(on_new_stage=stages.append)
    evidence.receive(0, report(0, requests=40))
    evidence.reset_stage()
    evidence.receive(1, report(0, requests=25, errors=25))  # sent before it heard of stage 1
    evidence.receive(0, report(1, requests=4, total=44))  # totals are cumulative
    assert stages == [1]
    assert evidence.stage_counts()["canary"] == StageCounts(requests=4)
    assert sum(evidence.arms["canary"].code_totals) == 69  # the totals keep everything


def test_an_exited_worker_keeps_its_counts_in_totals_and_in_its_stage():
    evidence = SummedEvidence()
    evidence.receive(0, report(0, requests=10, total=100))
    evidence.receive(1, report(0, requests=20, total=200))
    before = sum(evidence.arms["canary"].code_totals)
    evidence.retire(0)
    evidence.receive(0, report(0, requests=1, total=1))  # its replacement starts at zero
    assert sum(evidence.arms["canary"].code_totals) == before + 1  # never backwards
    assert evidence.stage_counts()["canary"].requests == 31
    assert evidence.arms["canary"].inflight == 2  # only live workers have requests in flight
    evidence.reset_stage()
    assert evidence.stage_counts()["canary"].requests == 0
