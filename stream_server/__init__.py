"""sana-wm-stream: the streaming server (HTTP, WebRTC, scheduler, sessions, replays) and its CLI."""
