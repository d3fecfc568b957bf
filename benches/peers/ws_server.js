// One-room broadcast server on the `ws` library, the peer for `roomd bench fanout
// --target ws`: every text message a client sends goes to every other open client.
//
// Usage: node ws_server.js [port]   (default 0: any free port on 127.0.0.1)
// Prints `listening on PORT` once ready.
'use strict';
const { WebSocketServer, WebSocket } = require('ws');

const wss = new WebSocketServer({ host: '127.0.0.1', port: Number(process.argv[2] || 0) });

wss.on('connection', (socket) => {
  socket.on('message', (data, isBinary) => {
    for (const client of wss.clients) {
      if (client !== socket && client.readyState === WebSocket.OPEN) {
        client.send(data, { binary: isBinary });
      }
    }
  });
});

wss.on('listening', () => {
  console.log(`listening on ${wss.address().port}`);
});

process.on('SIGTERM', () => process.exit(0));
