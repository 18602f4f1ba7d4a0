"""Who watches what: vehicle -> viewers and viewer -> vehicles, both O(1).

Viewers whose subscription sets are equal receive byte-identical batches, so
the registry also groups them into :class:`Audience` objects; a flush builds
one batch per audience instead of one per viewer. Grouping is lazy: a change
marks the viewer, and :meth:`SubscriptionRegistry.audiences` regroups the
marked viewers once, so a viewer subscribing to 200 vehicles in a row costs
one regrouping, not 200.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Set
from typing import Any, Final, Generic, TypeVar

import attrs

#: Subscribing to this vehicle id means every vehicle.
WILDCARD: Final = "*"
_EVERYTHING: Final = frozenset({WILDCARD})

ViewerT = TypeVar("ViewerT", bound=Hashable)
VehicleFilter = Callable[[str], bool]
#: What a restricted viewer may watch: a hashable key (equal keys, equal
#: rights) and the test itself.
Scope = tuple[Hashable, VehicleFilter]
AudienceKey = tuple[frozenset[str], Hashable]


@attrs.define(eq=False)
class Audience(Generic[ViewerT]):
    """Viewers with identical subscriptions (and, for the wildcard, identical rights)."""

    key: AudienceKey
    vehicles: frozenset[str]
    #: Set for a wildcard audience of restricted viewers: the vehicles they may see.
    may_watch: VehicleFilter | None = None
    members: set[ViewerT] = attrs.field(factory=set)

    @property
    def wildcard(self) -> bool:
        return self.vehicles is _EVERYTHING


class SubscriptionRegistry(Generic[ViewerT]):
    def __init__(self) -> None:
        self._by_vehicle: dict[str, set[ViewerT]] = {}
        self._by_viewer: dict[ViewerT, set[str]] = {}
        self._audiences: dict[AudienceKey, Audience[ViewerT]] = {}
        self._audience_of: dict[ViewerT, Audience[ViewerT]] = {}
        self._scopes: dict[ViewerT, Scope] = {}
        self._regroup: set[ViewerT] = set()

    def restrict(self, viewer: ViewerT, scope: Scope | None) -> None:
        """Limit what a wildcard subscription of ``viewer`` delivers (None: everything).

        Explicit subscriptions are checked against the viewer's rights when they
        are made; the wildcard is filtered at every flush.
        """
        if scope is None:
            self._scopes.pop(viewer, None)
        else:
            self._scopes[viewer] = scope
        self._regroup.add(viewer)

    def subscribe(self, viewer: ViewerT, vehicle_id: str) -> bool:
        """Add a subscription; False if it was already there."""
        vehicles = self._by_viewer.setdefault(viewer, set())
        if vehicle_id in vehicles:
            return False
        vehicles.add(vehicle_id)
        self._by_vehicle.setdefault(vehicle_id, set()).add(viewer)
        self._regroup.add(viewer)
        return True

    def unsubscribe(self, viewer: ViewerT, vehicle_id: str) -> bool:
        """Remove a subscription; False if there was none."""
        vehicles = self._by_viewer.get(viewer)
        if vehicles is None or vehicle_id not in vehicles:
            return False
        vehicles.discard(vehicle_id)
        if not vehicles:
            del self._by_viewer[viewer]
        viewers = self._by_vehicle[vehicle_id]
        viewers.discard(viewer)
        if not viewers:
            del self._by_vehicle[vehicle_id]
        self._regroup.add(viewer)
        return True

    def remove_viewer(self, viewer: ViewerT) -> None:
        """Forget every subscription of a viewer that went away."""
        for vehicle_id in self._by_viewer.pop(viewer, ()):
            viewers = self._by_vehicle[vehicle_id]
            viewers.discard(viewer)
            if not viewers:
                del self._by_vehicle[vehicle_id]
        self._regroup.discard(viewer)
        self._scopes.pop(viewer, None)
        self._leave_audience(viewer)

    def subscribers(self, vehicle_id: str) -> Set[ViewerT]:
        return self._by_vehicle.get(vehicle_id, frozenset())

    def subscriptions(self, viewer: ViewerT) -> Set[str]:
        return self._by_viewer.get(viewer, frozenset())

    def audiences(self) -> Iterable[Audience[ViewerT]]:
        for viewer in self._regroup:
            self._leave_audience(viewer)
            vehicles = self._by_viewer.get(viewer)
            if not vehicles:
                continue
            may_watch: VehicleFilter | None = None
            if WILDCARD not in vehicles:
                key: AudienceKey = (frozenset(vehicles), None)
            elif (scope := self._scopes.get(viewer)) is None:
                key = (_EVERYTHING, None)
            else:
                key, may_watch = (_EVERYTHING, scope[0]), scope[1]
            audience = self._audiences.get(key)
            if audience is None:
                audience = self._audiences[key] = Audience(key, key[0], may_watch)
            audience.members.add(viewer)
            self._audience_of[viewer] = audience
        self._regroup.clear()
        return self._audiences.values()

    def _leave_audience(self, viewer: ViewerT) -> None:
        audience = self._audience_of.pop(viewer, None)
        if audience is not None:
            audience.members.discard(viewer)
            if not audience.members:
                del self._audiences[audience.key]

    def stats(self) -> dict[str, Any]:
        counts = {vehicle_id: len(viewers) for vehicle_id, viewers in self._by_vehicle.items()}
        return {
            "totalVehicles": len(self._by_vehicle),
            "totalClients": len(self._by_viewer),
            "totalSubscriptions": sum(counts.values()),
            "vehicleSubscriptions": counts,
        }
