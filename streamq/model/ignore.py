"""`ignore_layers`: which modules stay in high precision. One matcher, used by quantize
(the layer layouts) and by `verify` (the format's ignore list), so both apply the same rules."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class IgnoreMatcher:
    """`ignore_layers` entries: exact module names (or their parents) or `re:` patterns."""

    patterns: tuple[str, ...]
    _regexes: list[re.Pattern] = field(init=False, default_factory=list)
    _names: set[str] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        for p in self.patterns:
            if p.startswith("re:"):
                self._regexes.append(re.compile(p[3:]))
            else:
                self._names.add(p)

    def matches(self, module_name: str) -> bool:
        if any(r.fullmatch(module_name) or r.match(module_name) for r in self._regexes):
            return True
        # "model.layers.3" ignores everything below it; "q_proj" alone matches the suffix.
        parts = module_name.split(".")
        prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        suffixes = {".".join(parts[i:]) for i in range(len(parts))}
        return bool(self._names & (prefixes | suffixes))

    def unmatched(self, module_names: list[str]) -> list[str]:
        """Entries that match none of `module_names` (any module, Linear or not: the seed's
        `model.embed_tokens` names a real module and is fine), in the order given."""
        return [p for p in self.patterns if not any(IgnoreMatcher((p,)).matches(m) for m in module_names)]
