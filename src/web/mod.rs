//! What the browser gets from the binary: the JavaScript client (`/client.js`, its
//! types `/client.d.ts`), the demo page (`/`), the operators' dashboard
//! (`/dashboard`), and the routes of the SSE stream and of the Admin API the dashboard
//! reads (`crate::http::admin`).
//!
//! The assets are files in this directory, embedded at build time (`include_str!`), so
//! the binary serves them with nothing to install and they cannot drift from the
//! server they came with. They are plain HTML, CSS and ES modules: no build step.

use actix_web::http::header;
use actix_web::{web, HttpResponse};

/// One embedded file: its path, content type and bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("demo.html"),
    },
    Asset {
        path: "/dashboard",
        content_type: "text/html; charset=utf-8",
        body: include_str!("dashboard.html"),
    },
    Asset {
        path: "/client.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("client.js"),
    },
    Asset {
        path: "/client.d.ts",
        content_type: "application/typescript; charset=utf-8",
        body: include_str!("client.d.ts"),
    },
    Asset {
        path: "/demo.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("demo.js"),
    },
    Asset {
        path: "/dashboard.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("dashboard.js"),
    },
    Asset {
        path: "/roomd.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("roomd.css"),
    },
];

/// Registers the pages, the assets, the SSE stream and the Admin API.
pub fn routes(cfg: &mut web::ServiceConfig) {
    for asset in ASSETS {
        cfg.route(
            asset.path,
            web::get().to(move || async move {
                HttpResponse::Ok()
                    .insert_header((header::CONTENT_TYPE, asset.content_type))
                    // Revalidated on every load, so a new server version is picked up.
                    .insert_header((header::CACHE_CONTROL, "no-cache"))
                    .insert_header(("x-content-type-options", "nosniff"))
                    .body(asset.body)
            }),
        );
    }
    cfg.route("/favicon.ico", web::get().to(HttpResponse::NoContent))
        .route("/api/rooms", web::get().to(crate::http::admin::list_rooms))
        .route(
            "/api/rooms/{room}/presence",
            web::get().to(crate::http::admin::presence),
        )
        .route(
            "/api/rooms/{room}/stream",
            web::get().to(crate::sse::stream),
        );
}
