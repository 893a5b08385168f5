"""Secrets in settings: masked wherever settings are shown, and the placeholders, empty
required secrets and the development signing key that a service refuses to start with
(libs/common/settings.refusals, libs/common/runner.run_service)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from libs.common.settings import DEV_SIGNING_KEYS, CommonSettings, load, mask_urls, refusals
from services.sender.settings import SenderSettings

ROOT = Path(__file__).resolve().parents[2]
GOOD = {
    "TAYORI_ADMIN_TOKEN": "a-real-admin-token",
    "TAYORI_SIGNING_KEYS": "k1:a-real-signing-key",
}


def test_a_url_password_is_masked_wherever_settings_are_shown() -> None:
    settings = CommonSettings(
        database_url="postgresql://tayori:S3cretPassw0rd@db.internal:5432/tayori",
        public_base_url="https://user:pa55@mail.example.com/base",
    )
    shown = repr(settings)
    assert "S3cretPassw0rd" not in shown and "pa55" not in shown
    assert "postgresql://tayori:***@db.internal:5432/tayori" in shown
    assert "https://user:***@mail.example.com/base" in shown
    # Without a password nothing changes; a password with an @ in it goes whole.
    assert mask_urls("postgresql://tayori@db/tayori") == "postgresql://tayori@db/tayori"
    assert mask_urls("redis://:p@ss@host:6379") == "redis://:***@host:6379"
    assert (
        mask_urls("postgresql:///tayori?host=/run&password=S3cret&sslmode=require")
        == "postgresql:///tayori?host=/run&password=***&sslmode=require"
    )


def test_secret_fields_are_masked_and_empty_ones_are_shown_empty() -> None:
    shown = repr(CommonSettings(admin_token="tok-123", api_tokens=""))
    assert "tok-123" not in shown and "admin_token=***" in shown and "api_tokens=''" in shown


def test_real_secrets_are_accepted() -> None:
    assert refusals(load(CommonSettings, GOOD)) == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TAYORI_ADMIN_TOKEN", "REPLACE_ME"),
        ("TAYORI_ADMIN_TOKEN", "changeme"),
        ("TAYORI_API_TOKENS", "operator:REPLACE_ME,viewer:REPLACE_ME"),
        ("TAYORI_API_TOKENS", "operator:good-token,viewer:CHANGE-ME"),
        ("TAYORI_SIGNING_KEYS", "k1:REPLACE_ME"),
        ("DATABASE_URL", "postgresql://tayori:REPLACE_ME@postgres:5432/tayori"),
        ("DATABASE_URL", "postgresql://tayori@postgres/tayori?password=REPLACE_ME"),
    ],
)
def test_a_placeholder_where_a_secret_belongs_is_refused_naming_the_variable(
    name: str, value: str
) -> None:
    problems = refusals(load(CommonSettings, {**GOOD, name: value}))
    assert len(problems) == 1 and problems[0].startswith(f"{name} holds the placeholder")


def test_placeholders_in_kafka_and_smtp_secrets_are_refused_too() -> None:
    environ = {
        **GOOD,
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "tayori",
        "KAFKA_SASL_PASSWORD": "REPLACE_ME",
        "SMTP_PASSWORD": "REPLACE_ME",
    }
    problems = refusals(load(SenderSettings, environ))
    assert sorted(p.split()[0] for p in problems) == ["KAFKA_SASL_PASSWORD", "SMTP_PASSWORD"]


@pytest.mark.parametrize("name", ["TAYORI_ADMIN_TOKEN", "TAYORI_SIGNING_KEYS"])
def test_a_required_secret_left_empty_is_refused(name: str) -> None:
    problems = refusals(load(CommonSettings, {**GOOD, name: " "}))
    assert problems == [f"{name} is required and empty"]


@pytest.mark.parametrize("keys", [None, DEV_SIGNING_KEYS, f"k2:new-key,{DEV_SIGNING_KEYS}"])
def test_the_development_signing_key_is_refused_outside_the_dev_profile(keys: str | None) -> None:
    environ = {"TAYORI_ADMIN_TOKEN": "a-real-admin-token"}
    if keys is not None:
        environ["TAYORI_SIGNING_KEYS"] = keys
    (problem,) = refusals(load(CommonSettings, environ))
    assert problem.startswith("TAYORI_SIGNING_KEYS is unset or holds the published development key")
    assert refusals(load(CommonSettings, {**environ, "TAYORI_PROFILE": "dev"})) == []


def test_an_unknown_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="TAYORI_PROFILE: expected production or dev"):
        load(CommonSettings, {**GOOD, "TAYORI_PROFILE": "prod"})


def _tayori(*argv: str, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``tayori <argv>`` with only ``environ`` (and PATH): it must stop before it connects
    to anything, so nothing else is needed."""
    env = {"PATH": os.environ.get("PATH", ""), "DATABASE_URL": "postgresql://u@127.0.0.1:1/x"}
    return subprocess.run(
        [sys.executable, "-m", "tayori", *argv],
        env={**env, **environ},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_service_refuses_to_start_with_one_json_line_naming_the_variables() -> None:
    done = _tayori(
        "suppression",
        environ={
            "DATABASE_URL": "postgresql://tayori:Db-S3cret-9@127.0.0.1:1/tayori",
            "TAYORI_ADMIN_TOKEN": "REPLACE_ME",
            "TAYORI_API_TOKENS": "operator:op-S3cret-7",
        },
    )
    assert done.returncode == 2, done.stderr
    lines = [json.loads(line) for line in (done.stdout + done.stderr).splitlines()]
    errors = [line for line in lines if line["level"] == "error"]
    assert len(errors) == 1 and errors[0]["event"] == "service_start_refused", lines
    problems = errors[0]["problems"]
    assert [p.split()[0] for p in problems] == ["TAYORI_ADMIN_TOKEN", "TAYORI_SIGNING_KEYS"]
    output = done.stdout + done.stderr
    assert "Db-S3cret-9" not in output and "op-S3cret-7" not in output


def test_a_setting_that_cannot_be_read_is_one_json_line_too() -> None:
    done = _tayori("contacts", environ={**GOOD, "KAFKA_SECURITY_PROTOCOL": "SASL_SSL"})
    assert done.returncode == 2, done.stderr
    (line,) = [json.loads(line) for line in (done.stdout + done.stderr).splitlines()]
    assert line["event"] == "service_start_refused" and line["service"] == "contacts"
    assert line["problems"][0].startswith("KAFKA_SASL_MECHANISM: expected one of")


def test_migrations_refuse_too_and_topics_names_a_kafka_setting() -> None:
    """``tayori migrate`` (the Kubernetes initContainer) stops where its service would;
    ``tayori topics`` says what is wrong with the Kafka settings in one line."""
    migrate = _tayori("migrate", "contacts", environ={**GOOD, "TAYORI_SIGNING_KEYS": "k1:TODO"})
    assert migrate.returncode == 2, migrate.stderr
    (line,) = [json.loads(line) for line in migrate.stderr.splitlines()]
    assert line["problems"] == [
        "TAYORI_SIGNING_KEYS holds the placeholder 'TODO' where a secret belongs: "
        "set the real value"
    ]
    topics = _tayori(
        "topics",
        environ={"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CA_FILE": "/nowhere/ca.pem"},
    )
    assert topics.returncode == 1
    assert topics.stderr == "tayori: KAFKA_SSL_CA_FILE: /nowhere/ca.pem does not exist\n"
