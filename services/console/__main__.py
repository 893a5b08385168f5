"""``python -m services.console`` (or ``tayori console``): run the console."""

from libs.common.runner import run_service
from services.console.app import build
from services.console.settings import ConsoleSettings

if __name__ == "__main__":
    run_service(ConsoleSettings, build)
