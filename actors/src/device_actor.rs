//! A device's actor ([`DeviceActor`]): the ractor adapter for application actors, which
//! `call!` it with [`DeviceMsg::Submit`].
//!
//! The actor never awaits the GPU: a `Submit` is admitted (state, quarantine, breaker,
//! in-flight bound) and handed with its reply port to the device's executor, which answers
//! the caller directly. Only when the in-flight bound is reached does a `Submit` wait — in
//! a task of its own, so the actor keeps serving.

use std::sync::Arc;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SpawnErr};

use crate::error::RuntimeError;
use crate::messages::DeviceMsg;
use crate::shared::Shared;

/// The actor of one device. Its state is built in `pre_start`, so a restart starts clean;
/// the device's executor and queue are not the actor's to lose, so ops in flight survive
/// an actor restart.
pub struct DeviceActor;

/// Arguments of a [`DeviceActor`].
pub struct DeviceActorArgs {
    pub(crate) shared: Arc<Shared>,
    pub(crate) device: u32,
}

/// State of a [`DeviceActor`].
pub struct DeviceActorState {
    shared: Arc<Shared>,
    device: u32,
}

impl Actor for DeviceActor {
    type Msg = DeviceMsg;
    type State = DeviceActorState;
    type Arguments = DeviceActorArgs;

    async fn pre_start(
        &self,
        me: ActorRef<DeviceMsg>,
        args: DeviceActorArgs,
    ) -> Result<DeviceActorState, ActorProcessingErr> {
        let core = &args.shared.cores[args.device as usize];
        *hipvisor_core::sync::write(&core.actor) = Some(me);
        Ok(DeviceActorState {
            shared: args.shared,
            device: args.device,
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<DeviceMsg>,
        msg: DeviceMsg,
        st: &mut DeviceActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DeviceMsg::Submit { op, reply } | DeviceMsg::TrySubmit { op, reply }
                if Shared::reserved(st.device, &op).is_some() =>
            {
                let _ = reply.send(Err(Shared::reserved(st.device, &op).expect("reserved")));
            }
            DeviceMsg::Submit { op, reply } => {
                if let Some((op, reply)) = st.shared.submit_now(st.device, op, reply.into(), false, None) {
                    // At the bound: wait for a slot in a task, so the actor keeps serving.
                    let shared = st.shared.clone();
                    let device = st.device;
                    tokio::spawn(async move { shared.submit(device, op, reply, true).await });
                }
            }
            DeviceMsg::TrySubmit { op, reply } => {
                if let Some((_, reply)) = st.shared.submit_now(st.device, op, reply.into(), true, None) {
                    let capacity = st.shared.cores[st.device as usize].capacity;
                    let busy = RuntimeError::Busy {
                        device: st.device,
                        capacity,
                    };
                    reply.send(Err(busy), None);
                }
            }
            DeviceMsg::State(reply) => {
                let _ = reply.send(st.shared.cores[st.device as usize].state.get());
            }
            DeviceMsg::Crash(why) => panic!("device actor {} crashed on request: {why}", st.device),
        }
        Ok(())
    }
}

/// Starts the actor of `device`, linked to (supervised by) `supervisor`.
///
/// # Errors
/// ractor's, when the actor cannot start.
pub(crate) async fn spawn(
    shared: Arc<Shared>,
    device: u32,
    supervisor: ActorCell,
) -> Result<ActorRef<DeviceMsg>, SpawnErr> {
    let args = DeviceActorArgs { shared, device };
    let (actor, _) = Actor::spawn_linked(None, DeviceActor, args, supervisor).await?;
    Ok(actor)
}
