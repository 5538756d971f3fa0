"""A DescribeRegions answer is checked before its names go into endpoint URLs."""

from __future__ import annotations

from typing import Any

import pytest

from agent.errors import SamplingError
from agent.collect import MAX_REGIONS, enabled_regions


def test_the_enabled_regions_of_an_answer() -> None:
    answer = {"Regions": [{"RegionName": "us-east-1", "OptInStatus": "opt-in-not-required"},
                          {"RegionName": "af-south-1", "OptInStatus": "not-opted-in"},
                          {"RegionName": "eu-west-1"}, {"RegionName": "us-gov-west-1"}]}
    assert enabled_regions(answer) == ["eu-west-1", "us-east-1", "us-gov-west-1"]


@pytest.mark.parametrize("answer, said", [
    ({}, "no usable region list"),  # an HTML 200 parses to no Regions at all
    ({"Regions": None}, "no usable region list"),
    ({"Regions": []}, "no usable region list"),
    ({"Regions": [{"RegionName": f"us-east-{n}"} for n in range(MAX_REGIONS + 1)]}, "no usable region list"),
    ({"Regions": ["us-east-1"]}, "not one"),
    ({"Regions": [{"RegionName": "evil.example.com/"}]}, "not one"),
    ({"Regions": [{"RegionName": "us-east-1"}, {}]}, "not one"),
])
def test_an_answer_that_is_not_a_region_list_fails_by_name(answer: Any, said: str) -> None:
    with pytest.raises(SamplingError, match=said):
        enabled_regions(answer)
