"""Teams, members and roles: team-scoped fetches that make another team's object a
404 (`access`), API tokens (`tokens`), team and membership changes (`services`), the
team page, member forms and the token page."""
