"""Settings: `.env` parsing, the environment overriding `.env`, one clear line per bad setting."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from scripts.errors import SettingsError
from scripts.settings import SETTINGS, Settings, load_settings
from dataclasses import fields


def write_env(tmp_path: Path, text: str) -> Path:
    env_file = tmp_path / ".env"
    env_file.write_text(text)
    return env_file


def test_defaults_are_the_guides_values(tmp_path):
    settings = load_settings(tmp_path / "missing.env", environ={})
    assert settings.deploy_user == "deploy"
    assert settings.deploy_path == PurePosixPath("/var/www/flask_helpdesk")
    assert settings.backup_path == PurePosixPath("/var/backups/flask_helpdesk")
    assert settings.service_name == "flask-helpdesk"
    assert settings.app_port == 5000
    assert settings.package_max_mb == 20
    assert settings.uses_sandbox


def test_env_file_is_parsed(tmp_path):
    env_file = write_env(tmp_path, """
# a comment
DEPLOY_SERVER=helpdesk.example.com
DEPLOY_USER="release"
DEPLOY_PATH='/srv/helpdesk'
SERVICE_NAME=helpdesk.service
PACKAGE_MAX_MB=12.5
SSH_KEY_FILE=~/.ssh/flask_helpdesk_deploy
""")
    settings = load_settings(env_file, environ={})
    assert settings.deploy_servers == ("helpdesk.example.com",)
    assert not settings.uses_sandbox
    assert settings.deploy_user == "release"
    assert settings.deploy_path == PurePosixPath("/srv/helpdesk")
    assert settings.service_name == "helpdesk"
    assert settings.package_max_mb == 12.5
    assert settings.ssh_key_file == Path("~/.ssh/flask_helpdesk_deploy").expanduser()


def test_environment_overrides_env_file(tmp_path):
    env_file = write_env(tmp_path, "DEPLOY_SERVER=from-file.example.com\nDEPLOY_USER=fileuser\n")
    settings = load_settings(env_file, environ={"DEPLOY_SERVER": "from-env.example.com"})
    assert settings.deploy_servers == ("from-env.example.com",)
    assert settings.deploy_user == "fileuser"


def test_several_servers_and_the_sandbox_word(tmp_path):
    many = load_settings(tmp_path / "none", environ={"DEPLOY_SERVER": "a.example.com, 10.0.0.5"})
    assert many.deploy_servers == ("a.example.com", "10.0.0.5")
    assert load_settings(tmp_path / "none", environ={"DEPLOY_SERVER": "sandbox"}).uses_sandbox


@pytest.mark.parametrize("entry, host, port", [
    ("web_1", "web_1", None), ("deploy@staging_web:2222", "staging_web", "2222"),
    ("[::1]:40022", "::1", "40022"), ("deploy@[2001:db8::1]:2222", "2001:db8::1", "2222")])
def test_deploy_server_takes_ssh_config_aliases_with_underscores_and_ipv6(tmp_path, entry,
                                                                          host, port):
    from scripts.settings import split_host
    settings = load_settings(tmp_path / "none", environ={"DEPLOY_SERVER": entry})
    assert settings.deploy_servers == (entry,)
    assert split_host(entry)[1:] == (host, port)


@pytest.mark.parametrize("name, value, expected", [
    ("DEPLOY_SERVER", "", "DEPLOY_SERVER='' is empty"),
    ("DEPLOY_SERVER", "bad host;rm", "not a host name"),
    ("DEPLOY_SERVER", "-oProxyCommand=x", "not a host name"),
    ("DEPLOY_SERVER", "web_1.-bad", "not a host name"),
    ("DEPLOY_USER", "", "DEPLOY_USER='' must be a Linux user name"),
    ("DEPLOY_USER", "Root User", "must be a Linux user name"),
    ("DEPLOY_PATH", "", "DEPLOY_PATH='' must be an absolute path"),
    ("DEPLOY_PATH", "/", "must not be the root directory"),
    ("DEPLOY_PATH", "var/www", "must be an absolute path"),
    ("DEPLOY_PATH", "/var/www/../etc", "must not contain '..'"),
    ("DEPLOY_PATH", "/var/my app", "no spaces, quotes"),
    ("BACKUP_PATH", "/var/b'k", "no spaces, quotes"),
    ("BACKUP_PATH", "/var/bk;rm -rf", "no spaces, quotes"),
    ("BACKUP_PATH", "/var/$(reboot)", "no spaces, quotes"),
    ("SERVICE_NAME", "flask helpdesk", "not a valid service name"),
    ("SERVICE_NAME", "-x", "not a valid service name"),
    ("SERVICE_NAME", "..", "not a valid service name"),
    ("SERVICE_NAME", "a/b", "not a valid service name"),
    ("RELEASE", ".", "must be a release id"),
    ("RELEASE", "..", "must be a release id"),
    ("RELEASE", "../etc", "must be a release id"),
    ("RESTORE_BACKUP", "..", "must be a backup name"),
    ("RESTORE_BACKUP", ".hidden", "must be a backup name"),
    ("RESTORE_BACKUP", "a/b", "must be a backup name"),
    ("APP_PORT", "http", "must be a port number from 1 to 65535"),
    ("APP_PORT", "70000", "must be a port number from 1 to 65535"),
    ("SSH_PORT", "0", "must be a port number from 1 to 65535"),
    ("PACKAGE_MAX_MB", "big", "must be a number of megabytes"),
    ("TARGET_PYTHON", "three", "must be a Python version"),
    ("DRY_RUN", "maybe", "must be 1 or 0"),
    ("MIGRATIONS_PATHS", "../secrets", "'../secrets' must be a path inside the app"),
    ("MIGRATIONS_PATHS", "migrations,a b", "'a b' must be a path inside the app"),
])
def test_each_bad_setting_gets_one_clear_line(tmp_path, name, value, expected):
    with pytest.raises(SettingsError) as caught:
        load_settings(tmp_path / "none", environ={name: value})
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"setting {name}=")
    assert expected in message
    assert "fix it in .env or the environment" in message


def test_all_problems_are_reported_at_once(tmp_path):
    with pytest.raises(SettingsError) as caught:
        load_settings(tmp_path / "none", environ={"APP_PORT": "x", "DEPLOY_PATH": "/"})
    lines = str(caught.value).splitlines()
    assert [line.split("=")[0] for line in lines] == ["setting DEPLOY_PATH", "setting APP_PORT"]


def test_settings_table_matches_the_settings_object():
    assert [s.field_name for s in SETTINGS] == [f.name for f in fields(Settings)
                                                 if f.name != "given"]


def test_env_example_documents_every_setting():
    example = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    for setting in SETTINGS:
        assert setting.name in example, setting.name


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    blocks = [block.split("\n", 1)[1].strip() for block in readme.split("```")[1::2]][:2]
    assert blocks == ["./.ci/install && .venv/bin/doit deploy",
                      "./.ci/install && .venv/bin/python -m pytest"]
    ci_run = (root / ".ci" / "run").read_text()
    assert "./.ci/install" in ci_run and ".venv/bin/python -m pytest" in ci_run


def test_a_gitlab_pipeline_must_name_its_server(tmp_path):
    with pytest.raises(SettingsError, match="DEPLOY_SERVER is not set; add it as a GitLab"):
        load_settings(tmp_path / "none", environ={"GITLAB_CI": "true"})
    ok = load_settings(tmp_path / "none", environ={"GITLAB_CI": "true",
                                                   "DEPLOY_SERVER": "helpdesk.example.com"})
    assert ok.deploy_servers == ("helpdesk.example.com",)


def test_service_name_is_validated_by_one_pattern_in_python_and_in_bash():
    import re

    from scripts.settings import REPO_ROOT, SERVICE_NAME_PATTERN
    script = (REPO_ROOT / "server_setup.sh").read_text()
    bash_pattern = re.search(r"^readonly SERVICE_NAME_PATTERN='([^']+)'$", script, re.M).group(1)
    assert bash_pattern == SERVICE_NAME_PATTERN
    for name in ("flask-helpdesk", "app_2", "web:blue", "a.b"):
        assert re.match(SERVICE_NAME_PATTERN, name), name
    for name in (".", "..", "-x", "a/b", "a b", "x@y", "a" * 101):
        assert not re.match(SERVICE_NAME_PATTERN, name), name


@pytest.mark.parametrize("typo, meant", [("DEPLOY_SEVRER", "DEPLOY_SERVER"),
                                         ("KEEP_RELEASE", "KEEP_RELEASES"),
                                         ("HEALTH_PAHT", "HEALTH_PATH")])
def test_a_misspelt_setting_in_env_file_or_environment_is_an_error_naming_the_setting(
        tmp_path, typo, meant):
    for env_file, environ in ((write_env(tmp_path, f"{typo}=x\n"), {}),
                              (tmp_path / "missing.env", {typo: "x"})):
        with pytest.raises(SettingsError) as error:
            load_settings(env_file, environ=environ)
        assert f"setting {typo} " in str(error.value)
        assert f"did you mean {meant}?" in str(error.value)


@pytest.mark.parametrize("typo, meant, value", [("MIGRATE_COMAND", "MIGRATE_COMMAND", "x"),
                                                ("HEALTH_PAHT", "HEALTH_PATH", "/x"),
                                                ("KEEP_RELEASE", "KEEP_RELEASES", "3")])
def test_a_misspelt_setting_is_an_error_also_when_the_setting_it_means_is_set(
        tmp_path, typo, meant, value):
    # In .env beside the right name, or on the command line over a .env value: either way the
    # misspelt value would be ignored without a word.
    right = {"MIGRATE_COMMAND": "flask x", "HEALTH_PATH": "/ok", "KEEP_RELEASES": "5"}[meant]
    for text, environ in ((f"{meant}={right}\n{typo}={value}\n", {}),
                          (f"{meant}={right}\n", {typo: value})):
        env_file = write_env(tmp_path, text)
        with pytest.raises(SettingsError) as error:
            load_settings(env_file, environ=environ)
        assert str(error.value).count("\n") == 0
        assert f"setting {typo} " in str(error.value)
        assert f"did you mean {meant}? ({meant} is set too" in str(error.value)


def test_other_unknown_names_in_env_file_are_a_warning_and_in_the_environment_nothing(
        tmp_path, capsys):
    env_file = write_env(tmp_path, "SECRET_KEY=abc\n")
    settings = load_settings(env_file, environ={"PATH": "/usr/bin", "CI_SERVER": "yes",
                                                "RELEASES": "x", "SSH_KNOWN_HOSTS": "key",
                                                "SSH_PRIVATE_KEY": "key"})
    assert settings.uses_sandbox
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "SECRET_KEY is not a toolkit setting" in err


def test_health_timeout_is_a_bounded_whole_number_of_seconds(tmp_path):
    assert load_settings(tmp_path / "none", environ={}).health_timeout_s == 30
    assert load_settings(tmp_path / "none", environ={"HEALTH_TIMEOUT_S": "5"}).health_timeout_s == 5
    for bad in ("0", "601", "2.5", "soon"):
        with pytest.raises(SettingsError, match="HEALTH_TIMEOUT_S"):
            load_settings(tmp_path / "none", environ={"HEALTH_TIMEOUT_S": bad})


@pytest.mark.parametrize("line, name", [("DEPLOY_SERVER 10.0.0.5", "DEPLOY_SERVER"),
                                        ('APP_DIR="/srv/app', "APP_DIR"),
                                        ("TELEGRAM_BOT_TOKEN='12345:secret", "TELEGRAM_BOT_TOKEN")])
def test_a_line_of_env_file_that_dotenv_cannot_parse_is_an_error_naming_line_and_setting(
        tmp_path, capsys, line, name):
    # python-dotenv skips such a line with a log message: a lost DEPLOY_SERVER would deploy to
    # the sandbox. The value is never shown (it may be a secret).
    env_file = write_env(tmp_path, f"KEEP_RELEASES=3\n{line}\nHEALTH_PATH=/ok\n")
    with pytest.raises(SettingsError) as error:
        load_settings(env_file, environ={})
    assert str(error.value) == (f"{env_file} line 2 ({name}) is not NAME=value, so it would be "
                                f"ignored; write it as NAME=value (quotes closed) or remove it")
    err = capsys.readouterr().err
    assert "secret" not in err + str(error.value) and "python-dotenv" not in err


@pytest.mark.parametrize("name, meant", [("deploy_server", "DEPLOY_SERVER"),
                                         ("Keep_Releases", "KEEP_RELEASES")])
def test_a_setting_written_in_lower_case_is_an_error_naming_the_setting(tmp_path, name, meant):
    with pytest.raises(SettingsError, match=f"setting {name} .*did you mean {meant}\\?"):
        load_settings(write_env(tmp_path, f"{name}=3\n"), environ={})


def test_an_app_env_file_that_does_not_exist_is_an_error_before_anything_runs(tmp_path):
    # It was read only when a new release shipped: a deploy with nothing to ship went on without
    # a word, the file the user named never uploaded.
    with pytest.raises(SettingsError) as error:
        load_settings(tmp_path / "none", environ={"APP_ENV_FILE": str(tmp_path / "app.env")})
    assert str(error.value) == (f"setting APP_ENV_FILE='{tmp_path / 'app.env'}' is not a file "
                                f"here; point it at one, or leave it unset; fix it in .env or "
                                f"the environment")
    (tmp_path / "app.env").write_text("SECRET_KEY=x\n")
    assert load_settings(tmp_path / "none", environ={"APP_ENV_FILE": str(tmp_path / "app.env")}
                         ).app_env_file == tmp_path / "app.env"


@pytest.mark.parametrize("url, address", [("http://127.0.0.1", "127.0.0.1"),
                                          ("ssh://deploy@web-1:2222", "deploy@web-1:2222"),
                                          ("https://helpdesk.example.com/", "helpdesk.example.com")])
def test_a_url_as_deploy_server_says_to_write_the_ssh_address_alone(tmp_path, url, address):
    with pytest.raises(SettingsError) as error:
        load_settings(tmp_path / "none", environ={"DEPLOY_SERVER": url})
    assert str(error.value) == (f"setting DEPLOY_SERVER={url!r} has {url!r}, a URL; write the SSH "
                                f"address alone, as in {address} or deploy@host:2222; fix it in "
                                f".env or the environment")


# -- what the app declares in its pyproject.toml ----------------------------------------------
def app_with(tmp_path: Path, table: str) -> Path:
    app_dir = tmp_path / "app"
    app_dir.mkdir(exist_ok=True)
    (app_dir / "pyproject.toml").write_text(f'[project]\nname = "app"\n\n{table}')
    return app_dir


def test_the_app_declares_its_migrations_below_env_file_and_environment(tmp_path):
    app_dir = app_with(tmp_path, '[tool.flask-deploy]\nmigrate-command = "flask --app app up"\n'
                                 'migrations-paths = ["app/db.py", "migrations/"]\n'
                                 'health-path = "/ping"\n')
    declared = load_settings(tmp_path / "missing.env", environ={"APP_DIR": str(app_dir)})
    assert declared.migrate_command == "flask --app app up"
    assert declared.migrations_paths == ("app/db.py", "migrations")
    assert declared.health_path == "/ping"
    assert declared.given == {"APP_DIR"}  # declared by the app, not given by the user
    env_file = write_env(tmp_path, f"APP_DIR={app_dir}\nMIGRATIONS_PATHS=\nHEALTH_PATH=/up\n")
    over = load_settings(env_file, environ={"HEALTH_PATH": "/health"})
    assert over.migrations_paths == ()  # .env's empty value: always migrate
    assert over.health_path == "/health"  # the environment over .env
    assert over.migrate_command == "flask --app app up"


def test_a_comma_separated_string_and_an_empty_list_declare_paths_too(tmp_path):
    app_dir = app_with(tmp_path, '[tool.flask-deploy]\nmigrations-paths = "a.py, b/"\n')
    assert load_settings(tmp_path / "missing.env", environ={"APP_DIR": str(app_dir)}) \
        .migrations_paths == ("a.py", "b")
    app_dir = app_with(tmp_path, '[tool.flask-deploy]\nmigrations-paths = []\n')
    assert load_settings(tmp_path / "missing.env", environ={"APP_DIR": str(app_dir)}) \
        .migrations_paths == ()


@pytest.mark.parametrize("table", ["", "[tool.black]\nline-length = 100\n"])
def test_no_pyproject_or_no_table_leaves_the_toolkits_defaults(tmp_path, table):
    app_dir = app_with(tmp_path, table) if table else tmp_path
    settings = load_settings(tmp_path / "missing.env", environ={"APP_DIR": str(app_dir)})
    assert settings.migrate_command == "flask --app wsgi migrate"
    assert settings.migrations_paths == ()
    assert settings.health_path == "/healthz"


def test_the_bundled_helpdesk_declares_its_migrations(tmp_path):
    settings = load_settings(tmp_path / "missing.env", environ={})
    assert settings.migrations_paths == ("helpdesk/db.py",)
    assert settings.migrate_command == "flask --app wsgi migrate"


@pytest.mark.parametrize("table, expected", [
    ('migrations-paths = ["../etc/passwd"]',
     "[tool.flask-deploy] migrations-paths = '../etc/passwd' '../etc/passwd' must be a path "
     "inside the app"),
    ('migrations-paths = [1, 2]',
     "[tool.flask-deploy] migrations-paths = [1, 2] must be a list of strings or a "
     "comma-separated string; fix it there"),
    ('migrations-paths = ["a,b"]', "migrations-paths = ['a,b'] must be a list of strings"),
    ('migrate-command = "flask migrate; rm -rf /"',
     "[tool.flask-deploy] migrate-command = 'flask migrate; rm -rf /' may hold only letters"),
    ('migrate-command = ["flask", "migrate"]', "migrate-command = ['flask', 'migrate'] must be "
                                               "a string; fix it there"),
    ('health-path = "healthz"', "[tool.flask-deploy] health-path = 'healthz' must be a URL path"),
    ('migration-paths = ["db.py"]', "[tool.flask-deploy] key 'migration-paths' is unknown; did "
                                    "you mean migrations-paths? the toolkit reads "
                                    "migrate-command, migrations-paths and health-path there"),
    ('deploy-server = "example.com"', "key 'deploy-server' is unknown; the toolkit reads"),
])
def test_a_bad_declaration_is_one_line_naming_the_file_and_the_key(tmp_path, table, expected):
    app_dir = app_with(tmp_path, f"[tool.flask-deploy]\n{table}\n")
    with pytest.raises(SettingsError) as error:
        load_settings(tmp_path / "missing.env", environ={"APP_DIR": str(app_dir)})
    lines = str(error.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{app_dir / 'pyproject.toml'}: "), lines
    assert expected in lines[0], lines[0]


def test_a_bad_declaration_overridden_in_env_file_is_still_named_and_broken_toml_too(tmp_path):
    # The file is the app's: a typo there is fixed there, even while .env hides it today.
    app_dir = app_with(tmp_path, '[tool.flask-deploy]\nhealth-path = "healthz"\n')
    with pytest.raises(SettingsError, match="health-path"):
        load_settings(tmp_path / "missing.env", environ={"APP_DIR": str(app_dir),
                                                         "HEALTH_PATH": "/up"})
    app_dir = app_with(tmp_path, '[tool.flask-deploy\nhealth-path = "/up"\n')
    with pytest.raises(SettingsError, match=r"pyproject.toml cannot be read as TOML \("):
        load_settings(tmp_path / "missing.env", environ={"APP_DIR": str(app_dir)})
