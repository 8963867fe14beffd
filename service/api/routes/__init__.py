"""One router per resource: searches, spaces, health, login (the dashboard's cookie)."""
