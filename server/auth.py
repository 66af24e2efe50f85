"""API keys and tenants from the auth file.

The file is JSON: `{"keys": {"<key>" | "sha256:<hex>": {"tenant": "acme", "admin": false}}}`, optionally with
`"tenants": {"acme": {"weight": 2.0, "max_concurrent": 8, "tokens_per_minute": 60000}}` to override the server-wide
limits and the fair-share weight of one tenant. Keys are kept only as sha256 digests in memory and compared with
`hmac.compare_digest` against every entry, so neither the key nor its position leaks through timing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

OPEN_TENANT = "default"  # the single tenant of a server started without an auth file
# the ASGI scope key under which a batch's line carries its Principal (server/batches/executor.py): only code in
# this process can put it there, since uvicorn builds the scope of every network request itself
BATCH_CALLER = "promptserve.batch_caller"
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEX_RE = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant scheduling, quotas and ownership are keyed on, and whether it may manage all tasks."""
    tenant: str
    admin: bool = False
    open: bool = False  # no auth file: the single open tenant, which may see and change everything
    # the batch a call runs for: set only in-process, for a batch's lines (server/batches), never from a request
    batch: str | None = None


@dataclass(frozen=True)
class TenantPolicy:
    """Per-tenant overrides from the auth file; None keeps the server-wide setting."""
    weight: float = 1.0
    max_concurrent: int | None = None
    tokens_per_minute: int | None = None


@dataclass
class KeyRing:
    """Authenticates bearer keys. `open` means no auth file: every caller is the one open tenant, as admin."""
    entries: list[tuple[bytes, Principal]] = field(default_factory=list)
    policies: dict[str, TenantPolicy] = field(default_factory=dict)
    open: bool = True

    @property
    def tenants(self) -> list[str]:
        return sorted({p.tenant for _, p in self.entries}) if not self.open else [OPEN_TENANT]

    def authenticate(self, key: str) -> Principal | None:
        """The principal of `key`, or None. Every entry is compared, in constant time per entry."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        found = None
        for stored, principal in self.entries:
            if hmac.compare_digest(digest, stored):
                found = principal
        return found

    def policy(self, tenant: str) -> TenantPolicy:
        return self.policies.get(tenant, TenantPolicy())

    @classmethod
    def open_ring(cls) -> "KeyRing":
        return cls(open=True)

    @classmethod
    def load(cls, path: Path) -> "KeyRing":
        """Parse the auth file; a ValueError names the entry that is wrong (the server refuses to start)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"auth file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"auth file {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("keys"), dict) or not data["keys"]:
            raise ValueError(f'auth file {path}: expected {{"keys": {{"<key>": {{"tenant": ..., "admin": ...}}}}}} '
                             "with at least one key")
        entries: list[tuple[bytes, Principal]] = []
        for n, (key, info) in enumerate(data["keys"].items()):
            where = f"auth file {path}, key #{n + 1}"
            if not isinstance(info, dict) or not isinstance(info.get("tenant"), str):
                raise ValueError(f'{where}: expected {{"tenant": "<name>", "admin": false}}, found {info!r}')
            unknown = set(info) - {"tenant", "admin"}
            if unknown:
                raise ValueError(f"{where}: unknown fields {sorted(unknown)}; expected tenant and admin")
            tenant, admin = info["tenant"], info.get("admin", False)
            if not _TENANT_RE.match(tenant):
                raise ValueError(f"{where}: tenant must match {_TENANT_RE.pattern}, found {tenant!r}")
            if not isinstance(admin, bool):
                raise ValueError(f"{where}: admin must be true or false, found {admin!r}")
            if key.startswith("sha256:"):
                hexd = key[len("sha256:"):]
                if not _HEX_RE.match(hexd):
                    raise ValueError(f"{where}: a hashed key is sha256: followed by 64 hex digits")
                digest = bytes.fromhex(hexd)
            elif len(key) < 16:
                raise ValueError(f"{where}: keys must be at least 16 characters long")
            else:
                digest = hashlib.sha256(key.encode("utf-8")).digest()
            entries.append((digest, Principal(tenant=tenant, admin=admin)))
        policies = {}
        for tenant, pol in (data.get("tenants") or {}).items():
            if not isinstance(pol, dict) or set(pol) - {"weight", "max_concurrent", "tokens_per_minute"}:
                raise ValueError(f"auth file {path}: tenants.{tenant}: expected weight, max_concurrent, "
                                 f"tokens_per_minute, found {pol!r}")
            weight = pol.get("weight", 1.0)
            if not isinstance(weight, (int, float)) or not weight > 0:
                raise ValueError(f"auth file {path}: tenants.{tenant}.weight must be > 0, found {weight!r}")
            for name in ("max_concurrent", "tokens_per_minute"):
                v = pol.get(name)
                if v is not None and (not isinstance(v, int) or v < 0):
                    raise ValueError(f"auth file {path}: tenants.{tenant}.{name} must be an integer >= 0")
            policies[tenant] = TenantPolicy(float(weight), pol.get("max_concurrent"), pol.get("tokens_per_minute"))
        return cls(entries=entries, policies=policies, open=False)


def hash_key(key: str) -> str:
    """The auth-file form of a key that is not kept in plain text."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()
