"""The synthetic organization: projects, users, service accounts, API keys, vector stores, models.

Everything is derived from the seed alone (never from the clock), so two simulators with the same
seed and org size serve the same organization.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

#: Entities are created between this epoch (2024-06-01T00:00:00Z) and ~120 days later.
ORG_EPOCH = 1717200000

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def h64(*parts: object) -> int:
    """A stable 64-bit hash of the parts (Python's hash() is salted per process)."""
    data = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def token(n: int, *parts: object) -> str:
    """A deterministic base62 token of n characters."""
    x = int.from_bytes(hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=32).digest(), "big")
    out = []
    for _ in range(n):
        x, r = divmod(x, 62)
        out.append(_B62[r])
    return "".join(out)


@dataclass(frozen=True)
class OrgSpec:
    """Size of the synthetic organization. `traffic` scales how many groups are active per minute."""

    n_projects: int = 5
    n_archived_projects: int = 1
    n_users: int = 20
    n_keys: int = 15
    n_service_accounts: int = 3
    n_models: int = 10
    n_vector_stores: int = 4
    traffic: float = 1.0
    audit_events_per_hour: float = 4.0


ORG_SIZES: dict[str, OrgSpec] = {
    "small": OrgSpec(),
    "large": OrgSpec(
        n_projects=50,
        n_archived_projects=5,
        n_users=2000,
        n_keys=500,
        n_service_accounts=40,
        n_models=20,
        n_vector_stores=60,
        traffic=1.0,
        audit_events_per_hour=40.0,
    ),
}


@dataclass(frozen=True)
class Model:
    name: str
    stream: str  # completions | embeddings | moderations | images | audio_speeches | audio_transcriptions
    family: str  # the alias the dated snapshot belongs to (same rate limits)
    avg_in: int = 0  # tokens per request (completions/embeddings/moderations)
    avg_out: int = 0
    audio: bool = False
    vision: bool = False


# In priority order: an org with n_models uses the first n. The first ten cover every stream.
MODEL_CATALOG: tuple[Model, ...] = (
    Model("gpt-4o-mini-2024-07-18", "completions", "gpt-4o-mini", 1800, 350, vision=True),
    Model("text-embedding-3-small", "embeddings", "text-embedding-3-small", 600),
    Model("omni-moderation-2024-09-26", "moderations", "omni-moderation-latest", 300),
    Model("gpt-4o-2024-08-06", "completions", "gpt-4o", 2500, 500, vision=True),
    Model("dall-e-3", "images", "dall-e-3"),
    Model("tts-1", "audio_speeches", "tts-1"),
    Model("whisper-1", "audio_transcriptions", "whisper-1"),
    Model("o3-mini-2025-01-31", "completions", "o3-mini", 3000, 1800),
    Model("gpt-image-1", "images", "gpt-image-1"),
    Model("text-embedding-3-large", "embeddings", "text-embedding-3-large", 900),
    Model("gpt-4.1-2025-04-14", "completions", "gpt-4.1", 4000, 600, vision=True),
    Model("gpt-4.1-mini-2025-04-14", "completions", "gpt-4.1-mini", 2200, 400, vision=True),
    Model("gpt-4o-audio-preview-2024-12-17", "completions", "gpt-4o-audio-preview", 1200, 500, audio=True),
    Model("o4-mini-2025-04-16", "completions", "o4-mini", 2800, 1500, vision=True),
    Model("dall-e-2", "images", "dall-e-2"),
    Model("tts-1-hd", "audio_speeches", "tts-1-hd"),
    Model("gpt-4o-transcribe", "audio_transcriptions", "gpt-4o-transcribe"),
    Model("text-embedding-ada-002-v2", "embeddings", "text-embedding-ada-002"),
    Model("text-moderation-007", "moderations", "text-moderation-latest", 250),
    Model("gpt-4.1-nano-2025-04-14", "completions", "gpt-4.1-nano", 1500, 200),
    Model("o3-2025-04-16", "completions", "o3", 5000, 2500, vision=True),
    Model("gpt-4o-realtime-preview-2024-12-17", "completions", "gpt-4o-realtime-preview", 1500, 700, audio=True),
)

FIRST_NAMES = (
    "Ada", "Alan", "Grace", "Linus", "Margaret", "Ken", "Barbara", "Dennis", "Frances", "John", "Radia",
    "Tim", "Katherine", "Edsger", "Hedy", "Donald", "Sophie", "Guido", "Anita", "Bjarne", "Priya",
    "Wei", "Muskan", "Kofi", "Ines", "Mateo", "Yuki", "Olga", "Arjun", "Fatima", "Lars", "Chen",
)
LAST_NAMES = (
    "Lovelace", "Turing", "Hopper", "Torvalds", "Hamilton", "Thompson", "Liskov", "Ritchie", "Allen",
    "Backus", "Perlman", "Berners-Lee", "Johnson", "Dijkstra", "Lamarr", "Knuth", "Wilson", "Rossum",
    "Borg", "Stroustrup", "Sharma", "Zhang", "Agarwal", "Mensah", "Garcia", "Lopez", "Tanaka", "Ivanova",
    "Patel", "Khan", "Nielsen", "Wang",
)
PROJECT_WORDS = (
    "Support Bot", "Search", "Internal Tools", "Data Platform", "Mobile App", "Voice Assistant", "Analytics",
    "Marketing", "Docs QA", "Code Review", "Risk", "Onboarding", "Translation", "Billing", "Research",
    "Sales Copilot", "Moderation", "Recommendations", "Fraud", "Content Studio",
)
KEY_NAMES = ("prod", "staging", "dev", "ci", "batch-jobs", "backend", "notebook", "etl", "worker", "eval")


@dataclass
class Project:
    id: str
    name: str
    created_at: int
    archived_at: int | None
    users: list[tuple[str, str, int]] = field(default_factory=list)  # (user id, role, added_at)
    service_accounts: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    vector_stores: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "archived" if self.archived_at is not None else "active"

    def to_api(self) -> dict:
        return {
            "id": self.id,
            "object": "organization.project",
            "name": self.name,
            "created_at": self.created_at,
            "archived_at": self.archived_at,
            "status": self.status,
        }


@dataclass
class User:
    id: str
    name: str
    email: str
    role: str  # owner | reader
    added_at: int

    def to_api(self) -> dict:
        return {
            "object": "organization.user",
            "id": self.id,
            "name": self.name,
            "email": self.email,
            "role": self.role,
            "added_at": self.added_at,
        }


@dataclass
class ServiceAccount:
    id: str
    name: str
    project_id: str
    role: str
    created_at: int


@dataclass
class ApiKey:
    id: str
    name: str
    project_id: str
    owner_type: str  # user | service_account
    owner_id: str
    created_at: int
    weight: float  # relative traffic
    redacted_value: str


class Organization:
    """The seeded organization. Lists are in a fixed order; lookups by id are dicts."""

    def __init__(self, seed: int, spec: OrgSpec):
        self.seed = seed
        self.spec = spec
        rng = random.Random(h64(seed, "org"))
        self.org_id = "org-" + token(24, seed, "org-id")

        # Models: the first n of the catalog.
        self.models: list[Model] = list(MODEL_CATALOG[: max(1, min(spec.n_models, len(MODEL_CATALOG)))])
        self.models_by_stream: dict[str, list[Model]] = {}
        for m in self.models:
            self.models_by_stream.setdefault(m.stream, []).append(m)

        # Users.
        self.users: list[User] = []
        seen_emails: set[str] = set()
        for i in range(spec.n_users):
            first = FIRST_NAMES[rng.randrange(len(FIRST_NAMES))]
            last = LAST_NAMES[rng.randrange(len(LAST_NAMES))]
            email = f"{first}.{last}".lower().replace("-", "") + "@example.com"
            if email in seen_emails:
                email = email.replace("@", f"{i}@")
            seen_emails.add(email)
            self.users.append(User(
                id="user-" + token(24, seed, "user", i),
                name=f"{first} {last}",
                email=email,
                role="owner" if i < max(1, spec.n_users // 20) else "reader",
                added_at=ORG_EPOCH + rng.randrange(0, 120 * 86400),
            ))
        self.users_by_id = {u.id: u for u in self.users}

        # Projects (the archived ones last so active usage concentrates on the first).
        self.projects: list[Project] = []
        n_arch = min(spec.n_archived_projects, max(0, spec.n_projects - 1))
        for i in range(spec.n_projects):
            created = ORG_EPOCH + i * 3600 * 7 + rng.randrange(0, 3600)
            word = PROJECT_WORDS[i % len(PROJECT_WORDS)]
            name = word if i < len(PROJECT_WORDS) else f"{word} {i // len(PROJECT_WORDS) + 1}"
            archived = created + rng.randrange(10, 60) * 86400 if i >= spec.n_projects - n_arch else None
            self.projects.append(Project(id="proj_" + token(24, seed, "project", i), name=name, created_at=created,
                                         archived_at=archived))
        self.projects_by_id = {p.id: p for p in self.projects}
        active = [p for p in self.projects if p.archived_at is None] or self.projects

        # Membership: every user in 1-3 projects (project weight skewed towards the first ones).
        pweights = [1.0 / (1 + 0.3 * i) for i in range(len(self.projects))]
        for u in self.users:
            k = 1 + rng.randrange(3)
            chosen = set(rng.choices(range(len(self.projects)), weights=pweights, k=k))
            for pi in sorted(chosen):
                p = self.projects[pi]
                p.users.append((u.id, "owner" if rng.random() < 0.15 else "member", max(u.added_at, p.created_at)))
        for p in self.projects:
            if not p.users:
                u = self.users[rng.randrange(len(self.users))]
                p.users.append((u.id, "owner", max(u.added_at, p.created_at)))

        # Service accounts, spread over the active projects.
        self.service_accounts: list[ServiceAccount] = []
        for i in range(spec.n_service_accounts):
            p = active[i % len(active)]
            sa = ServiceAccount(id="svc_acct_" + token(24, seed, "svc", i), name=f"{p.name.lower().replace(' ', '-')}-bot-{i}",
                                project_id=p.id, role="member" if i % 3 else "owner",
                                created_at=p.created_at + rng.randrange(3600, 30 * 86400))
            self.service_accounts.append(sa)
            p.service_accounts.append(sa.id)
        self.service_accounts_by_id = {s.id: s for s in self.service_accounts}

        # API keys: ~80% owned by project members, ~20% by service accounts. Zipf-like traffic weights.
        self.keys: list[ApiKey] = []
        for i in range(spec.n_keys):
            p = self.projects[rng.choices(range(len(self.projects)), weights=pweights)[0]]
            if p.service_accounts and rng.random() < 0.2:
                owner_type, owner = "service_account", p.service_accounts[rng.randrange(len(p.service_accounts))]
            else:
                owner_type, owner = "user", p.users[rng.randrange(len(p.users))][0]
            secret = token(48, seed, "secret", i)
            k = ApiKey(
                id="key_" + token(16, seed, "key", i),
                name=f"{KEY_NAMES[rng.randrange(len(KEY_NAMES))]}-{i}",
                project_id=p.id,
                owner_type=owner_type,
                owner_id=owner,
                created_at=p.created_at + rng.randrange(600, 40 * 86400),
                weight=1.0 / (1 + i) ** 0.8,
                redacted_value=f"sk-proj-{secret[:2]}***{secret[-4:]}" if owner_type == "user" else f"sk-svcacct-{secret[:2]}***{secret[-4:]}",
            )
            self.keys.append(k)
            p.keys.append(k.id)
        self.keys_by_id = {k.id: k for k in self.keys}
        # Usage only comes from keys of active projects.
        self.active_keys = [k for k in self.keys if self.projects_by_id[k.project_id].archived_at is None]

        # Vector stores, in active projects.
        self.vector_stores: list[tuple[str, str]] = []  # (vs id, project id)
        for i in range(spec.n_vector_stores):
            p = active[rng.randrange(len(active))]
            vs = "vs_" + token(24, seed, "vs", i)
            self.vector_stores.append((vs, p.id))
            p.vector_stores.append(vs)

    def key_user_id(self, k: ApiKey) -> str:
        """The usage API's user_id for a key: the owning user, or the service account's id."""
        return k.owner_id

    def actor_for_key(self, k: ApiKey) -> dict:
        if k.owner_type == "user":
            u = self.users_by_id[k.owner_id]
            return {"id": k.id, "type": "user", "user": {"id": u.id, "email": u.email}}
        return {"id": k.id, "type": "service_account", "service_account": {"id": k.owner_id}}

    def project_api_key(self, k: ApiKey, now: float) -> dict:
        p = self.projects_by_id[k.project_id]
        if k.owner_type == "user":
            u = self.users_by_id[k.owner_id]
            role = next((r for uid, r, _ in p.users if uid == u.id), "member")
            owner = {"type": "user", "user": {"id": u.id, "email": u.email, "name": u.name,
                                              "created_at": u.added_at, "role": role}}
        else:
            sa = self.service_accounts_by_id[k.owner_id]
            owner = {"type": "service_account", "service_account": {"id": sa.id, "name": sa.name,
                                                                    "created_at": sa.created_at, "role": sa.role}}
        last_used = None
        if k in self.active_keys and now > k.created_at:
            last_used = max(k.created_at, int(now) - (h64(self.seed, "lastused", k.id) % 7200))
        return {
            "object": "organization.project.api_key",
            "redacted_value": k.redacted_value,
            "name": k.name,
            "created_at": k.created_at,
            "last_used_at": last_used,
            "id": k.id,
            "owner_project_access": "inactive" if p.archived_at is not None else "active",
            "owner": owner,
        }


# ----------------------------------------------------------------------------------------- rate limits

# family -> (rpm, tpm, optional extras). Snapshots share their family's numbers.
_RATE_LIMIT_BASE: dict[str, tuple[int, int, dict]] = {
    "gpt-4o-mini": (30000, 150000000, {"batch_1_day_max_input_tokens": 15000000000}),
    "gpt-4o": (10000, 30000000, {"batch_1_day_max_input_tokens": 5000000000}),
    "o3-mini": (30000, 150000000, {"batch_1_day_max_input_tokens": 15000000000}),
    "gpt-4.1": (10000, 30000000, {"batch_1_day_max_input_tokens": 5000000000}),
    "gpt-4.1-mini": (30000, 150000000, {"batch_1_day_max_input_tokens": 15000000000}),
    "gpt-4.1-nano": (30000, 150000000, {"batch_1_day_max_input_tokens": 15000000000}),
    "o4-mini": (30000, 150000000, {"batch_1_day_max_input_tokens": 15000000000}),
    "o3": (10000, 30000000, {"batch_1_day_max_input_tokens": 5000000000}),
    "gpt-4o-audio-preview": (10000, 2500000, {"max_audio_megabytes_per_1_minute": 500}),
    "gpt-4o-realtime-preview": (10000, 2500000, {"max_audio_megabytes_per_1_minute": 500}),
    "text-embedding-3-small": (10000, 10000000, {"batch_1_day_max_input_tokens": 4000000000}),
    "text-embedding-3-large": (10000, 10000000, {"batch_1_day_max_input_tokens": 4000000000}),
    "text-embedding-ada-002": (10000, 10000000, {"batch_1_day_max_input_tokens": 4000000000}),
    "omni-moderation-latest": (10000, 10000000, {}),
    "text-moderation-latest": (10000, 1000000, {}),
    "dall-e-3": (10000, 100000, {"max_images_per_1_minute": 50}),
    "dall-e-2": (10000, 100000, {"max_images_per_1_minute": 100}),
    "gpt-image-1": (5000, 8000000, {"max_images_per_1_minute": 250}),
    "tts-1": (10000, 100000, {"max_audio_megabytes_per_1_minute": 50, "max_requests_per_1_day": 100000}),
    "tts-1-hd": (10000, 100000, {"max_audio_megabytes_per_1_minute": 50, "max_requests_per_1_day": 100000}),
    "whisper-1": (10000, 100000, {"max_audio_megabytes_per_1_minute": 200}),
    "gpt-4o-transcribe": (10000, 2000000, {"max_audio_megabytes_per_1_minute": 200}),
    "gpt-3.5-turbo": (10000, 50000000, {"batch_1_day_max_input_tokens": 10000000000, "max_tokens_per_1_day": 900000000}),
    "babbage-002": (3000, 250000, {"max_requests_per_1_day": 100000, "max_tokens_per_1_day": 9000000}),
    "davinci-002": (3000, 250000, {"max_requests_per_1_day": 100000, "max_tokens_per_1_day": 9000000}),
}


def rate_limit_rows(org: Organization, project: Project) -> list[dict]:
    """A project's rate limits: families and their dated snapshots (identical numbers), sorted by id."""
    names: dict[str, str] = {fam: fam for fam in _RATE_LIMIT_BASE}
    for m in MODEL_CATALOG:
        if m.name != m.family:
            names[m.name] = m.family
    # Some projects have lowered limits on some families (project-level overrides).
    rows = []
    for name, fam in names.items():
        rpm, tpm, extra = _RATE_LIMIT_BASE[fam]
        f = h64(org.seed, "rl", project.id, fam) % 10
        factor = 0.5 if f == 0 else 0.25 if f == 1 else 1.0
        row = {
            "object": "project.rate_limit",
            "id": f"rl-{name}",
            "model": name,
            "max_requests_per_1_minute": max(1, int(rpm * factor)),
            "max_tokens_per_1_minute": max(1, int(tpm * factor)),
        }
        for k, v in extra.items():
            row[k] = max(1, int(v * factor))
        rows.append(row)
    rows.sort(key=lambda r: r["id"])
    return rows
