"""The local stack: docker-compose.yml's services as local processes (`cascade stack`)."""
