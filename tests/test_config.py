"""routes.yaml validation: each kind of mistake gets one message naming the key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import load_config
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

VALID = """\
model: m
backends:
  baseline: {url: http://127.0.0.1:8080}
  speculative: {url: http://127.0.0.1:8081}
routing:
  split: {baseline: 50, speculative: 50}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    return path


def test_repository_routes_yaml_is_valid() -> None:
    config = load_config(ROOT / "routes.yaml")
    assert set(config.backends) == {"baseline", "speculative"}


def test_defaults_are_filled_in(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, VALID))
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 8000)
    assert config.routing.header == "X-Backend"
    assert config.backends["baseline"].model == "default_model"
    assert config.limits.max_body_bytes == 10 * 1024 * 1024


def test_backend_left_out_of_the_split_gets_weight_zero(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, VALID.replace("baseline: 50, speculative: 50", "baseline: 100"))
    )
    assert config.weights() == [("baseline", 100.0), ("speculative", 0.0)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("baseline: 50, speculative: 50", "baseline: 50, speculative: 40"),
            "routing.split: percentages add up to 90, not 100",
        ),
        (
            ("baseline: 50, speculative: 50", "baseline: 50, other: 50"),
            "routing.split: unknown backend other (backends are: baseline, speculative)",
        ),
        (
            ("baseline: 50, speculative: 50", "baseline: 150, speculative: -50"),
            "routing.split: speculative: percentage must be between 0 and 100, not -50",
        ),
        (
            ("baseline: 50, speculative: 50", "baseline: 50, speculative: lots"),
            "routing.split.speculative: percentage must be a number, not 'lots'",
        ),
        (
            ("http://127.0.0.1:8081", "localhost:8081"),
            "backends.speculative.url: must be an http:// URL",
        ),
        (("routing:", "routing:\n  spilt: 1"), "routing.spilt: unknown key"),
        (("model: m\n", ""), "model: required key is missing"),
        (
            ("model: m\n", "model: m\nlisten: {port: 70000}\n"),
            "listen.port: Input should be less than or equal to 65535",
        ),
        (
            ("baseline: 50, speculative: 50", "baseline: true, speculative: 50"),
            "routing.split.baseline: percentage must be a number, not True",
        ),
        (
            ("http://127.0.0.1:8081", "http://127.0.0.1:8081/v1"),
            "backends.speculative.url: must be just scheme, host and port",
        ),
        (
            ("http://127.0.0.1:8081", "https://127.0.0.1:8081"),
            "backends.speculative.url: must be an http:// URL",
        ),
        (
            ("routing:", "routing:\n  header: X Backend"),
            "routing.header: 'X Backend' is not a valid header name",
        ),
        (
            ("routing:", "routing:\n  header: Authorization"),
            "routing.header: Authorization is a header the proxy must forward or set itself",
        ),
        (
            ("routing:", "routing:\n  sticky_header: x-backend"),
            "routing: sticky_header must differ from header",
        ),
        (("baseline: {url", "base line: {url"), "backends: 'base line' is not a usable name"),
        (
            ("{url: http://127.0.0.1:8081}", "{url: http://127.0.0.1:8081, fallback: nowhere}"),
            "backends.speculative.fallback: unknown backend nowhere",
        ),
        (
            ("{url: http://127.0.0.1:8081}", "{url: http://127.0.0.1:8081, fallback: speculative}"),
            "backends.speculative.fallback: a backend cannot be its own fallback",
        ),
        (("routing:", "routing:\n  baseline: nobody"), "routing.baseline: unknown backend nobody"),
        (
            ("{url: http://127.0.0.1:8081}", "{url: http://127.0.0.1:8081, max_in_flight: 0}"),
            "backends.speculative.max_in_flight: Input should be greater than or equal to 1",
        ),
        (
            ("{url: http://127.0.0.1:8081}", "{url: http://127.0.0.1:8081, timeouts: {read: 5}}"),
            "backends.speculative.timeouts.read: unknown key",
        ),
        (
            ("model: m\n", "model: m\nauth: {api_keys: ['']}\n"),
            "auth.api_keys: an API key must not be empty",
        ),
        (
            ("routing:", "routing:\n  split: {baseline: 100}\nrouting:"),
            "routing is given twice (first on line 5)",
        ),
        (
            ("baseline: 50, speculative: 50", "baseline: 50, speculative: 50, baseline: 0"),
            "routing.split.baseline is given twice (first on line 6)",
        ),
        (
            ("  speculative: {url", "  baseline: {url"),
            "backends.baseline is given twice (first on line 3)",
        ),
    ],
)
def test_invalid_file_names_the_key_and_problem(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, VALID.replace(*change)))
    assert message in str(info.value)


def test_fallback_defaults_to_the_baseline_and_can_be_turned_off(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, VALID))
    assert config.baseline == "baseline"
    assert (config.fallback_of("speculative"), config.fallback_of("baseline")) == ("baseline", None)
    off = VALID.replace(
        "{url: http://127.0.0.1:8081}", "{url: http://127.0.0.1:8081, fallback: null}"
    )
    assert load_config(write(tmp_path, off)).fallback_of("speculative") is None
    renamed = VALID.replace("baseline", "base").replace("routing:", "routing:\n  baseline: base")
    assert load_config(write(tmp_path, renamed)).fallback_of("speculative") == "base"
    first = VALID.replace("baseline", "a")  # no backend named baseline: the first listed
    assert load_config(write(tmp_path, first)).fallback_of("speculative") == "a"


def test_config_version_follows_the_config_but_not_its_secrets(tmp_path: Path) -> None:
    version = load_config(write(tmp_path, VALID)).version()
    assert len(version) == 12 and version == load_config(write(tmp_path, VALID)).version()
    other_split = VALID.replace("baseline: 50, speculative: 50", "baseline: 60, speculative: 40")
    assert load_config(write(tmp_path, other_split)).version() != version
    keyed = VALID + "auth: {api_keys: [sk-one]}\n"
    rekeyed = VALID + "auth: {api_keys: [sk-two]}\n"
    assert load_config(write(tmp_path, keyed)).version() == (
        load_config(write(tmp_path, rekeyed)).version()
    )


def test_keys_from_an_unset_environment_variable_are_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "auth: {api_keys_env: SPECPROXY_TEST_UNSET_KEYS}\n")
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: auth.api_keys_env: environment variable SPECPROXY_TEST_UNSET_KEYS is not set"
        " or empty"
    )


def test_check_never_prints_a_secret(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "auth: {api_keys: [sk-very-secret], admin_token: adm-secret}\n")
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "API keys required; /admin/* admin token" in result.stdout
    assert "secret" not in result.stdout + result.stderr


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got an empty file"):
        load_config(write(tmp_path, ""))


def test_yaml_syntax_error_is_one_line_with_its_position(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "model: m\nrouting: [unclosed\n"))
    where = tmp_path / "routes.yaml"
    assert (
        str(info.value)
        == f"{where}:3:1: not valid YAML: expected ',' or ']', but got '<stream end>'"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            VALID + "routing:\n  split: {baseline: 100}\n",
            "7:1: not valid YAML: routing is given twice (first on line 5)",
        ),
        (
            VALID.replace("speculative: 50}", "speculative: 50, baseline: 0}"),
            "6:42: not valid YAML: routing.split.baseline is given twice (first on line 6)",
        ),
    ],
)
def test_duplicate_key_is_one_line_with_its_path_and_both_lines(
    tmp_path: Path, text: str, message: str
) -> None:
    """yaml.safe_load would keep the last one silently: the first block would be lost."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert str(info.value) == f"{tmp_path / 'routes.yaml'}:{message}"


def test_anchors_and_merge_keys_still_load(tmp_path: Path) -> None:
    """A merged key may be overridden, and `<<` given twice, as yaml.safe_load allows."""
    text = """\
model: m
backends:
  baseline: &shared {url: http://127.0.0.1:8080, max_queue: 3}
  speculative:
    <<: *shared
    url: http://127.0.0.1:8081
  draft:
    <<: *shared
    <<: {max_in_flight: 2}
    url: http://127.0.0.1:8082
routing:
  split: {baseline: 100}
"""
    backends = load_config(write(tmp_path, text)).backends
    assert [(b.url, b.max_queue, b.max_in_flight) for b in backends.values()] == [
        ("http://127.0.0.1:8080", 3, None),
        ("http://127.0.0.1:8081", 3, None),
        ("http://127.0.0.1:8082", 3, 2),
    ]


def test_file_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_bytes(b"model: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml")


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, VALID))
    with pytest.raises(ValueError, match="frozen"):
        config.model = "other"  # type: ignore[misc]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def test_serve_with_bad_config_exits_nonzero_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("speculative: 50", "speculative: 40"))
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"error: {path}: routing.split: percentages add up to 90, not 100"
    )
    assert "Traceback" not in result.stderr


def test_check_accepts_a_valid_config(tmp_path: Path) -> None:
    result = run_cli("check", "--config", str(write(tmp_path, VALID)))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "speculative" in result.stdout


def test_check_rejects_an_invalid_config(tmp_path: Path) -> None:
    result = run_cli("check", "--config", str(write(tmp_path, VALID.replace("model: m\n", ""))))
    assert result.returncode == 2
    assert "model: required key is missing" in result.stderr


@pytest.mark.parametrize(
    ("log_path", "problem"),
    [("logs", "it is a directory"), ("taken/requests.jsonl", "is not a directory")],
)
def test_check_rejects_a_log_path_serve_could_not_open(
    tmp_path: Path, log_path: str, problem: str
) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "taken").write_text("a file where a folder must be")
    path = write(tmp_path, VALID + f"logging: {{path: {tmp_path / log_path}}}\n")
    check, serve = (run_cli(command, "--config", str(path)) for command in ("check", "serve"))
    assert check.returncode == serve.returncode == 2
    cannot = f"error: logging.path: cannot open {tmp_path / log_path}: "
    assert check.stderr.startswith(cannot) and problem in check.stderr
    assert serve.stderr.startswith(cannot)  # the OS's words for it


def test_check_rejects_a_duplicate_key(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "routing:\n  split: {baseline: 100}\n")
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr == (
        f"error: {path}:7:1: not valid YAML: routing is given twice (first on line 5)\n"
    )
