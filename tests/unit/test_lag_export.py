"""The lag exporter's gauges: a group's info series follows its state; unknown members stay unset."""

from __future__ import annotations

from prometheus_client import REGISTRY

from services.pipeline.consumer_lag import GroupLag, PartitionLag, export


def info_states(group: str) -> dict[str, float]:
    return {
        sample.labels["state"]: sample.value
        for metric in REGISTRY.collect() if metric.name == "kminion_kafka_consumer_group_info"
        for sample in metric.samples if sample.labels["group_id"] == group
    }


def test_a_group_that_changes_state_keeps_one_info_series() -> None:
    export([GroupLag("unit-g1", "empty", 0)])
    export([GroupLag("unit-g1", "stable", 2, [PartitionLag("t", 0, 5, 9, 4, 2.5)])])
    assert info_states("unit-g1") == {"stable": 1.0}
    assert REGISTRY.get_sample_value("kminion_kafka_consumer_group_members", {"group_id": "unit-g1"}) == 2
    assert REGISTRY.get_sample_value("kafka_consumergroup_group_max_lag", {"group": "unit-g1"}) == 4
    assert REGISTRY.get_sample_value("kafka_consumergroup_group_max_lag_seconds", {"group": "unit-g1"}) == 2.5


def test_members_the_broker_did_not_list_are_not_exported_as_zero() -> None:
    export([GroupLag("unit-g2", "stable", None)])
    assert REGISTRY.get_sample_value("kminion_kafka_consumer_group_members", {"group_id": "unit-g2"}) is None
    assert info_states("unit-g2") == {"stable": 1.0}
