//! Modbus TCP: the bus behind a TCP gateway, served by tokio-modbus's TCP server.
//!
//! The unit id of each request picks the slave, as a TCP-to-RTU gateway forwards it onto its
//! line; so a unit id nobody has, an unpowered slave and the broadcast id 0 get no answer
//! (a real gateway would wait out its own RTU timeout; some then send exception 0x0B, this one
//! stays silent so TCP and RTU tests see the same timeout). Clients must address a slave:
//! tokio-modbus's `client::tcp::connect` uses unit 0xFF, which nobody here has; use
//! `connect_slave(addr, Slave(1))`. Requests on one connection are served one after another.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use runtime::Shutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio_modbus::server::Service;
use tokio_modbus::server::tcp::Server;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

use super::bus::{Dispatch, MeterBus, Op, Reply};

/// Serve `bus` on `listener` until shutdown (then every connection is dropped). Bind to
/// `127.0.0.1:0` and read `local_addr()` for a test's random port.
pub async fn serve_tcp(listener: TcpListener, bus: MeterBus, shutdown: Shutdown) -> io::Result<()> {
    let server = Server::new(listener);
    let on_connected = |stream: TcpStream, peer: SocketAddr| {
        let service = BusService { bus: bus.clone() };
        async move {
            tracing::debug!(%peer, "Modbus TCP client connected.");
            Ok(Some((service, stream)))
        }
    };
    let on_error = |e: io::Error| tracing::debug!(error = %runtime::telemetry::chain(&e), "Modbus TCP connection ended.");
    // Dropping `serve` on shutdown cancels every connection task it spawned.
    tokio::select! {
        () = shutdown.wait() => Ok(()),
        r = server.serve(&on_connected, on_error) => r,
    }
}

struct BusService {
    bus: MeterBus,
}

type Answer = Result<Option<Response>, ExceptionCode>;

impl Service for BusService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let op = op_of(&req.request);
        let dispatch = self.bus.dispatch(req.slave, &op);
        Box::pin(async move {
            match dispatch {
                Dispatch::Silent => Ok(None),
                Dispatch::Answer { reply, delay } => {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    reply.map(|r| Some(response_of(&op, r)))
                }
            }
        })
    }
}

fn op_of(req: &Request<'_>) -> Op {
    match req {
        Request::ReadHoldingRegisters(addr, count) => Op::ReadHolding {
            addr: *addr,
            count: *count,
        },
        Request::ReadInputRegisters(addr, count) => Op::ReadInput {
            addr: *addr,
            count: *count,
        },
        Request::WriteSingleRegister(addr, value) => Op::WriteSingle {
            addr: *addr,
            value: *value,
        },
        Request::WriteMultipleRegisters(addr, values) => Op::WriteMultiple {
            addr: *addr,
            values: values.to_vec(),
        },
        other => Op::Other(other.function_code().value()),
    }
}

fn response_of(op: &Op, reply: Reply) -> Response {
    match (op, reply) {
        (Op::ReadInput { .. }, Reply::Registers(r)) => Response::ReadInputRegisters(r),
        (_, Reply::Registers(r)) => Response::ReadHoldingRegisters(r),
        (_, Reply::WroteSingle(a, v)) => Response::WriteSingleRegister(a, v),
        (_, Reply::WroteMultiple(a, n)) => Response::WriteMultipleRegisters(a, n),
    }
}
