"""``python -m services.scheduler`` (or ``tayori scheduler``): run the scheduler service."""

from libs.common.runner import run_service
from services.scheduler.app import build
from services.scheduler.settings import SchedulerSettings

if __name__ == "__main__":
    run_service(SchedulerSettings, build)
