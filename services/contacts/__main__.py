"""``python -m services.contacts`` (or ``tayori contacts``): run the contacts service."""

from libs.common.runner import run_service
from services.contacts.app import build
from services.contacts.settings import ContactsSettings

if __name__ == "__main__":
    run_service(ContactsSettings, build)
