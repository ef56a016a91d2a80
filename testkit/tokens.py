"""JWTs as Supabase Auth and the platform hand them out, minted with the stack's secret."""

from __future__ import annotations

import sys
import time

import jwt


def mint_token(
    secret: str, sub: str | None, role: str = "authenticated", lifetime_s: float = 3600
) -> str:
    """A session token; with a `sub`, a signed-in user's (audience `authenticated`)."""
    now = int(time.time())
    claims: dict[str, object] = {"role": role, "iat": now, "exp": now + int(lifetime_s)}
    if sub is not None:
        claims["sub"] = sub
        claims["aud"] = "authenticated"
    return jwt.encode(claims, secret, algorithm="HS256")


def user_token(secret: str, user_id: str, lifetime_s: float = 3600) -> str:
    """What Supabase Auth would hand the signed-in user."""
    return mint_token(secret, user_id, lifetime_s=lifetime_s)


def role_key(secret: str, role: str) -> str:
    """A project API key for `anon` or `service_role` as the Supabase CLI prints it (claims iss,
    role, exp in that order, so the token is byte-identical to the CLI's)."""
    claims = {"iss": "supabase-demo", "role": role, "exp": 1983812996}
    return jwt.encode(claims, secret, algorithm="HS256")


if __name__ == "__main__":
    # `python -m testkit.tokens SECRET`: the project API keys, as `scripts/stack env` prints them.
    for variable, role in (
        ("SUPABASE_ANON_KEY", "anon"),
        ("SUPABASE_SERVICE_ROLE_KEY", "service_role"),
    ):
        print(f"{variable}={role_key(sys.argv[1], role)}")
