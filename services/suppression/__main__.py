"""``python -m services.suppression`` (or ``tayori suppression``): run the suppression service."""

from libs.common.runner import run_service
from services.suppression.app import build
from services.suppression.settings import SuppressionSettings

if __name__ == "__main__":
    run_service(SuppressionSettings, build)
