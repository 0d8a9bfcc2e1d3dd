"""Fast tests of the xenstore automation's parsing: requests and per-domain policy as written by anyone with
xenstore access, and ``xl sharing`` output."""

from __future__ import annotations

import pytest

from xenswap.errors import XenswapError
from xenswap.hv.xen.automation import REQUESTS, DomainPolicy, parse_policy, parse_request, parse_xl_sharing

LIVE = {0, 3, 5}


@pytest.mark.parametrize("action", REQUESTS)
def test_good_requests(action):
    assert parse_request("5", f" {action.upper()}\n", LIVE) == (5, action)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("five", "share", "bad request path /xenswap/request/five: the last part must be a domain id"),
    ("7", "share", "no domain 7"),
    ("0", "share", "Domain-0 runs this daemon"),
    ("3", "page out", "unknown request 'page out': expected one of page-out, page-out-all, page-in, share"),
    ("3", "x" * 100, "unknown request '" + "x" * 60 + "...'"),
    ("3", "", "unknown request ''"),
])
def test_bad_requests_say_what_is_wrong(key, value, message):
    with pytest.raises(XenswapError) as info:
        parse_request(key, value, LIVE)
    assert str(info.value).startswith(message)


def test_policy_values():
    policy, errors = parse_policy({"share": "ON", "auto-page-out": "no", "idle-threshold": "42.5"})
    assert errors == []
    assert policy == DomainPolicy(share=True, auto_page_out=False, idle_threshold_s=42.5)
    assert parse_policy(policy.to_xenstore()) == (policy, [])
    assert parse_policy({}) == (DomainPolicy(), [])


def test_bad_policy_values_keep_defaults_and_each_gets_a_line():
    policy, errors = parse_policy({"share": "maybe", "idle-threshold": "-1", "colour": "blue",
                                   "auto-page-out": "off"})
    assert policy == DomainPolicy(auto_page_out=False)
    assert errors == [
        "policy colour: unknown key (known: share, auto-page-out, idle-threshold)",
        "policy idle-threshold: '-1' is out of range (0 .. 10^7 s)",
        "policy share: 'maybe' is not on/off",
    ]
    assert parse_policy({"idle-threshold": "soon"})[1] == ["policy idle-threshold: 'soon' is not a number of seconds"]


def test_xl_sharing_output():
    out = ("Name                                        ID   Mem Shared\n"
           "Domain-0                                     0  1024      0\n"
           "my guest                                     3    19    108\n")
    assert parse_xl_sharing(out) == {0: 0, 3: 108}
    assert parse_xl_sharing("") == {}
