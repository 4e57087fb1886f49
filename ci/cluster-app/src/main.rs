//! An application actor of a distributed ractor application (ractor's `cluster` feature on)
//! that uses a hipvisor device: it messages the device's actor with `DeviceMsg::Submit`, as
//! any application actor does. Under `cluster`, ractor implements `Message` for no type by
//! itself: the application implements it for its own messages, hipvisor for its.

use hipvisor::core::config::Isolation;
use hipvisor::{DeviceMsg, Op, Reply, Runtime, RuntimeConfig};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

/// The application's own message: local-only here (a serializable one would implement
/// `serialize` and `deserialize` too).
enum AppMsg {
    /// Asks the device for its memory and answers the free bytes.
    FreeBytes(RpcReplyPort<u64>),
}

impl ractor::Message for AppMsg {}

struct App;

impl Actor for App {
    type Msg = AppMsg;
    type State = ActorRef<DeviceMsg>;
    type Arguments = ActorRef<DeviceMsg>;

    async fn pre_start(
        &self,
        _: ActorRef<AppMsg>,
        gpu: ActorRef<DeviceMsg>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(gpu)
    }

    async fn handle(&self, _: ActorRef<AppMsg>, msg: AppMsg, gpu: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let AppMsg::FreeBytes(reply) = msg;
        match ractor::call!(gpu, |reply| DeviceMsg::Submit { op: Op::MemInfo, reply })? {
            Ok(Reply::MemInfo(m)) => reply.send(m.free)?,
            other => return Err(format!("mem-info answered {other:?}").into()),
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = RuntimeConfig::default();
    config.runtime.isolation = Isolation::Thread;
    config.sim.devices = 1;
    let runtime = Runtime::builder().config(config).start().await?;
    let (app, handle) = Actor::spawn(None, App, runtime.device_ref(0)?).await?;
    let free = ractor::call!(app, AppMsg::FreeBytes)?;
    println!("a cluster-enabled application used a hipvisor device: {free} bytes free");
    app.stop(None);
    handle.await?;
    runtime.shutdown().await;
    Ok(())
}
