import Ingress
