"""The trust boundary: tenant code runs here, in processes that hold nothing of the platform.

- `policy`: what a tenant's sandboxes may do (limits, egress, paths), set by the platform.
- `protocol`: the private channel's wire format (length-prefixed JSON, never pickle).
- `jail`: the kernel mechanisms (namespaces, Landlock, seccomp, cgroups, rlimits, no
  capabilities) a sandbox process enters before any tenant code runs.
- `template`: a pre-imported process that forks jailed sandboxes in milliseconds.
- `runtime`: inside a sandbox: runs `run(event, step)` and speaks the protocol.
- `supervisor`: the trusted side: answers every message, enforces limits, and does
  the journal writes through the activation's `Step`.
- `egress`: the allowlisting proxy through which a tenant granted network access
  reaches the hosts the platform allowed, and nothing else.

docs/security.md describes the model for platform operators.
"""
