"""The subscription registry: both directions, cleanup, and audiences."""

from __future__ import annotations

from fleettrack.registry import WILDCARD, SubscriptionRegistry


def groups(registry: SubscriptionRegistry[str]) -> dict[frozenset[str], frozenset[str]]:
    """vehicles -> members of every audience."""
    result: dict[frozenset[str], frozenset[str]] = {}
    for audience in registry.audiences():
        assert audience.vehicles not in result, "one audience per subscription set"
        assert audience.members, "no empty audiences"
        result[audience.vehicles] = frozenset(audience.members)
    return result


def assert_empty(registry: SubscriptionRegistry[str]) -> None:
    assert registry.stats() == {
        "totalVehicles": 0,
        "totalClients": 0,
        "totalSubscriptions": 0,
        "vehicleSubscriptions": {},
    }
    assert groups(registry) == {}


def test_subscribe_is_visible_in_both_directions() -> None:
    registry: SubscriptionRegistry[str] = SubscriptionRegistry()
    assert registry.subscribe("alice", "a") is True
    assert registry.subscribe("alice", "b") is True
    assert registry.subscribe("bob", "a") is True
    assert set(registry.subscribers("a")) == {"alice", "bob"}
    assert set(registry.subscribers("b")) == {"alice"}
    assert set(registry.subscribers("c")) == set()
    assert set(registry.subscriptions("alice")) == {"a", "b"}
    assert set(registry.subscriptions("bob")) == {"a"}
    assert set(registry.subscriptions("carol")) == set()


def test_subscribing_twice_returns_false_and_changes_nothing() -> None:
    registry: SubscriptionRegistry[str] = SubscriptionRegistry()
    assert registry.subscribe("alice", "a")
    before = registry.stats()
    assert registry.subscribe("alice", "a") is False
    assert registry.stats() == before
    assert set(registry.subscribers("a")) == {"alice"}


def test_unsubscribe_returns_whether_there_was_a_subscription() -> None:
    registry: SubscriptionRegistry[str] = SubscriptionRegistry()
    registry.subscribe("alice", "a")
    assert registry.unsubscribe("alice", "b") is False
    assert registry.unsubscribe("bob", "a") is False
    assert registry.unsubscribe("alice", "a") is True
    assert registry.unsubscribe("alice", "a") is False


def test_unsubscribe_leaves_no_empty_sets() -> None:
    registry: SubscriptionRegistry[str] = SubscriptionRegistry()
    registry.subscribe("alice", "a")
    registry.subscribe("alice", "b")
    registry.subscribe("bob", "a")
    registry.unsubscribe("alice", "b")
    assert registry.stats()["vehicleSubscriptions"] == {"a": 2}
    registry.unsubscribe("alice", "a")
    assert registry.stats() == {
        "totalVehicles": 1,
        "totalClients": 1,
        "totalSubscriptions": 1,
        "vehicleSubscriptions": {"a": 1},
    }
    assert set(registry.subscriptions("alice")) == set()
    registry.unsubscribe("bob", "a")
    assert set(registry.subscribers("a")) == set()
    assert_empty(registry)


def test_unsubscribing_an_unknown_viewer_creates_nothing() -> None:
    registry: SubscriptionRegistry[str] = SubscriptionRegistry()
    registry.unsubscribe("ghost", "a")
    assert_empty(registry)


def test_remove_viewer_forgets_all_its_subscriptions_only() -> None:
    registry: SubscriptionRegistry[str] = SubscriptionRegistry()
    for vehicle in ("a", "b", "c"):
        registry.subscribe("alice", vehicle)
    registry.subscribe("bob", "b")
    registry.remove_viewer("alice")
    assert set(registry.subscriptions("alice")) == set()
    assert set(registry.subscribers("a")) == set()
    assert set(registry.subscribers("b")) == {"bob"}
    assert registry.stats() == {
        "totalVehicles": 1,
        "totalClients": 1,
        "totalSubscriptions": 1,
        "vehicleSubscriptions": {"b": 1},
    }
    registry.remove_viewer("alice")  # twice: harmless
    registry.remove_viewer("nobody")
    registry.remove_viewer("bob")
    assert_empty(registry)


def test_stats_figures() -> None:
    registry: SubscriptionRegistry[str] = SubscriptionRegistry()
    registry.subscribe("alice", "a")
    registry.subscribe("alice", "b")
    registry.subscribe("bob", "a")
    registry.subscribe("carol", WILDCARD)
    assert registry.stats() == {
        "totalVehicles": 3,
        "totalClients": 3,
        "totalSubscriptions": 4,
        "vehicleSubscriptions": {"a": 2, "b": 1, WILDCARD: 1},
    }


def test_viewers_with_identical_subscriptions_share_an_audience() -> None:
    registry: SubscriptionRegistry[str] = SubscriptionRegistry()
    registry.subscribe("alice", "a")
    registry.subscribe("alice", "b")
    registry.subscribe("bob", "b")
    registry.subscribe("bob", "a")  # same set, other order
    registry.subscribe("carol", "a")
    assert groups(registry) == {
        frozenset({"a", "b"}): frozenset({"alice", "bob"}),
        frozenset({"a"}): frozenset({"carol"}),
    }
    assert not any(audience.wildcard for audience in registry.audiences())


def test_wildcard_viewers_form_one_wildcard_audience() -> None:
    registry: SubscriptionRegistry[str] = SubscriptionRegistry()
    registry.subscribe("alice", WILDCARD)
    registry.subscribe("bob", "a")
    registry.subscribe("bob", WILDCARD)  # the wildcard covers "a" too
    registry.subscribe("carol", "a")
    audiences = list(registry.audiences())
    wildcard = [audience for audience in audiences if audience.wildcard]
    assert len(wildcard) == 1
    assert wildcard[0].members == {"alice", "bob"}
    assert wildcard[0].vehicles == frozenset({WILDCARD})
    assert groups(registry) == {
        frozenset({WILDCARD}): frozenset({"alice", "bob"}),
        frozenset({"a"}): frozenset({"carol"}),
    }


def test_audiences_follow_subscription_changes() -> None:
    registry: SubscriptionRegistry[str] = SubscriptionRegistry()
    registry.subscribe("alice", "a")
    registry.subscribe("bob", "a")
    assert groups(registry) == {frozenset({"a"}): frozenset({"alice", "bob"})}
    registry.subscribe("bob", "b")
    assert groups(registry) == {
        frozenset({"a"}): frozenset({"alice"}),
        frozenset({"a", "b"}): frozenset({"bob"}),
    }
    registry.subscribe("alice", "b")
    assert groups(registry) == {frozenset({"a", "b"}): frozenset({"alice", "bob"})}
    registry.unsubscribe("alice", "a")
    registry.unsubscribe("alice", "b")
    assert groups(registry) == {frozenset({"a", "b"}): frozenset({"bob"})}
    registry.unsubscribe("bob", WILDCARD)  # not subscribed: no change
    registry.subscribe("bob", WILDCARD)
    audiences = list(registry.audiences())
    assert len(audiences) == 1
    assert audiences[0].wildcard
    registry.unsubscribe("bob", WILDCARD)
    audiences = list(registry.audiences())
    assert [(a.vehicles, a.members, a.wildcard) for a in audiences] == [
        (frozenset({"a", "b"}), {"bob"}, False)
    ]


def test_audiences_disappear_when_empty() -> None:
    registry: SubscriptionRegistry[str] = SubscriptionRegistry()
    registry.subscribe("alice", "a")
    registry.subscribe("bob", WILDCARD)
    assert len(groups(registry)) == 2
    registry.unsubscribe("alice", "a")
    assert groups(registry) == {frozenset({WILDCARD}): frozenset({"bob"})}
    registry.remove_viewer("bob")
    assert groups(registry) == {}


def test_removed_viewer_is_in_no_audience_even_if_it_changed_since_last_grouping() -> None:
    registry: SubscriptionRegistry[str] = SubscriptionRegistry()
    registry.subscribe("alice", "a")
    registry.subscribe("bob", "a")
    assert len(groups(registry)) == 1
    registry.subscribe("alice", "b")  # pending regroup
    registry.subscribe("carol", "c")  # never grouped yet
    registry.remove_viewer("alice")
    registry.remove_viewer("carol")
    assert groups(registry) == {frozenset({"a"}): frozenset({"bob"})}


def test_many_subscriptions_in_a_row_group_correctly() -> None:
    registry: SubscriptionRegistry[str] = SubscriptionRegistry()
    vehicles = [f"v{i}" for i in range(200)]
    for viewer in ("alice", "bob"):
        for vehicle in vehicles:
            registry.subscribe(viewer, vehicle)
    registry.subscribe("carol", "v0")
    assert groups(registry) == {
        frozenset(vehicles): frozenset({"alice", "bob"}),
        frozenset({"v0"}): frozenset({"carol"}),
    }
    assert registry.stats()["totalSubscriptions"] == 401
