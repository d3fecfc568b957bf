// One-room broadcast server on Socket.IO 4, the peer for `roomd bench fanout --target
// socketio`: every `msg` event a client emits goes to every other connected client
// (`socket.broadcast.emit`). WebSocket transport only, as the bench speaks it.
//
// Usage: node socketio_server.js [port]   (default 0: any free port on 127.0.0.1)
// Prints `listening on PORT` once ready.
'use strict';
const http = require('http');
const { Server } = require('socket.io');

const server = http.createServer();
const io = new Server(server, { transports: ['websocket'], serveClient: false });

io.on('connection', (socket) => {
  socket.on('msg', (text) => {
    socket.broadcast.emit('msg', text);
  });
});

server.listen(Number(process.argv[2] || 0), '127.0.0.1', () => {
  console.log(`listening on ${server.address().port}`);
});

process.on('SIGTERM', () => process.exit(0));
