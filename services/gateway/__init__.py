"""The websocket gateway service (`gharial-gateway`); the logic lives in `gharial.gateway`."""
