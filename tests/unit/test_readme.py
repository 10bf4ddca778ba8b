"""README.md and README.ru.md say the same things: the same sections in the same order, and
the same settings, tasks and commands named."""

from __future__ import annotations

import re

from scripts.settings import REPO_ROOT

# Each English heading and its Russian one. A section added to one README and not the other,
# or moved, fails the test below.
SECTIONS = {
    "# flask-deploy — deploy a Flask app with one `doit deploy`":
        "# flask-deploy — развёртывание Flask-приложения одной командой `doit deploy`",
    "## What it does": "## Что он делает",
    "## Deployment guide": "## Руководство по развёртыванию",
    "### Step 1: prepare the server": "### Шаг 1: подготовка сервера",
    "### Step 2: SSH keys": "### Шаг 2: SSH-ключи",
    "### Servers in your SSH configuration": "### Серверы из вашей конфигурации SSH",
    "### Step 3: settings": "### Шаг 3: настройки",
    "### Step 4: first deploy": "### Шаг 4: первое развёртывание",
    "### Step 5: check the deploy": "### Шаг 5: проверка развёртывания",
    "### HTTPS": "### HTTPS",
    "### Rollback": "### Откат",
    "### Backups": "### Резервные копии",
    "### Troubleshooting": "### Решение проблем",
    "### Monitoring": "### Мониторинг",
    "### Security": "### Безопасность",
    "## GitLab CI/CD": "## GitLab CI/CD",
    "## Many servers": "## Много серверов",
    "## Notifications and history": "## Уведомления и история",
    "## Day two: run, hooks, maintenance": "## День второй: команды, хуки, обслуживание",
    "## Bring your own app": "## Своё приложение",
    "## On the server": "## На сервере",
    "## Sandbox servers": "## Тестовые серверы",
    "## What is where": "## Что где лежит",
    "## Tests and CI": "## Тесты и CI",
    "## Performance": "## Производительность",
}


def headings(text: str) -> list[str]:
    lines, in_code = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,4} ", line):
            lines.append(line.strip())
    return lines


def named(text: str) -> set[str]:
    """Settings (`UPPER_CASE`), `doit` tasks and shell commands in backquotes."""
    names = set(re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", text))
    names |= set(re.findall(r"`(?:[A-Z_]+=\S+ )*(doit [a-z_]+)", text))
    code = "\n".join(re.findall(r"^```(?:sh)?\n(.*?)^```", text, re.M | re.S))
    names |= {line.split("#")[0].strip() for line in code.splitlines()
              if line.startswith(("sudo ", "ssh", "curl ", ".venv/", "./", "chmod", "htop"))}
    return names


ENGLISH = (REPO_ROOT / "README.md").read_text()
RUSSIAN = (REPO_ROOT / "README.ru.md").read_text()


def test_readmes_have_the_same_sections_in_the_same_order():
    english = headings(ENGLISH)
    assert english == list(SECTIONS), "README.md's sections changed: update SECTIONS and " \
                                      "README.ru.md"
    assert headings(RUSSIAN) == [SECTIONS[title] for title in english]


def test_readmes_name_the_same_settings_tasks_and_commands():
    assert named(ENGLISH) - named(RUSSIAN) == set()
    assert named(RUSSIAN) - named(ENGLISH) == set()
