"""``python -m services.sender`` (or ``tayori sender``): run the sender service."""

from libs.common.runner import run_service
from services.sender.app import build
from services.sender.settings import SenderSettings

if __name__ == "__main__":
    run_service(SenderSettings, build)
