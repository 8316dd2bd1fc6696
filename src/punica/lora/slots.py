"""Which adapter sits in which device slot. Pure Python: LRU over unpinned slots, pin counts per
running request. Slot 0 is "no adapter" and is never handed out."""

from __future__ import annotations

from collections import OrderedDict


class SlotTable:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots  # usable slots 1..num_slots
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order: oldest first
        self._pins: dict[str, int] = {}
        self._free = list(range(num_slots, 0, -1))

    def slot_of(self, name: str) -> int | None:
        return self._slot_of.get(name)

    def resident(self) -> list[str]:
        return list(self._slot_of)

    def pins(self, name: str) -> int:
        return self._pins.get(name, 0)

    def can_place(self, name: str) -> bool:
        return name in self._slot_of or bool(self._free) or self._victim() is not None

    def place(self, name: str) -> tuple[int, str | None, bool]:
        """Give `name` a slot: (slot, evicted adapter or None, whether its weights must be loaded)."""
        if name in self._slot_of:
            self._slot_of.move_to_end(name)
            return self._slot_of[name], None, False
        evicted = None
        if not self._free:
            evicted = self._victim()
            if evicted is None:
                raise RuntimeError("every adapter slot is pinned by a running request")
            self._free.append(self._slot_of.pop(evicted))
        slot = self._free.pop()
        self._slot_of[name] = slot
        return slot, evicted, True

    def pin(self, name: str) -> None:
        self._pins[name] = self._pins.get(name, 0) + 1

    def unpin(self, name: str) -> None:
        left = self._pins[name] - 1
        if left:
            self._pins[name] = left
        else:
            del self._pins[name]

    def drop(self, name: str) -> int | None:
        """Forget `name` (must be unpinned); returns the slot it held, if any."""
        if self._pins.get(name):
            raise RuntimeError(f"adapter {name!r} is in use")
        slot = self._slot_of.pop(name, None)
        if slot is not None:
            self._free.append(slot)
        return slot

    def _victim(self) -> str | None:
        return next((n for n in self._slot_of if not self._pins.get(n)), None)
