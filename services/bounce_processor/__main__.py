"""``python -m services.bounce_processor`` (or ``tayori bounce_processor``): run the service."""

from libs.common.runner import run_service
from services.bounce_processor.app import build
from services.bounce_processor.settings import BounceSettings

if __name__ == "__main__":
    run_service(BounceSettings, build)
