"""Teams, members and roles: API tokens (`tokens`), team and membership changes
(`services`), the team page, member forms and the token page. The team-scoped
fetches every area uses are in `jobs/access.py`."""
